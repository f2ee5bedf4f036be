"""What the served model does with a tool: 10 prompts "What is the weather in CITY right now? Call the tool." with one
get_weather(city) tool at temperature 0, for tool_choice auto, required and named; counts the calls that came back
parsed, those whose arguments fit the schema exactly, and those naming the right city (the README's table).

    python benchmarks/tool_calls.py http://127.0.0.1:8000/v1     # a running gateway (or a vLLM server)
"""

from __future__ import annotations

import json
import sys

from openai import OpenAI

MODEL = "smollm2-135m-instruct"
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima", "Oslo", "Delhi"]


def main(base_url: str) -> None:
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    for choice in ("auto", "required", {"type": "function", "function": {"name": "get_weather"}}):
        called = valid = right = 0
        for city in CITIES:
            resp = client.chat.completions.create(
                model=MODEL, tools=[TOOL], tool_choice=choice, max_tokens=96, temperature=0,
                messages=[{"role": "user", "content": f"What is the weather in {city} right now? Call the tool."}],
                extra_headers={"Cache-Control": "no-cache, no-store"})
            calls = resp.choices[0].message.tool_calls or []
            if not calls:
                continue
            called += 1
            try:
                args = json.loads(calls[0].function.arguments)
            except ValueError:
                continue
            ok = isinstance(args, dict) and set(args) == {"city"} and isinstance(args["city"], str)
            valid += ok
            right += ok and args["city"].lower() == city.lower()
        name = choice if isinstance(choice, str) else "named"
        print(f"{name:9s} parsed {called}/{len(CITIES)}  schema-valid {valid}/{len(CITIES)}  "
              f"right city {right}/{len(CITIES)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1")
