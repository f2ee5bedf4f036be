"""The OpenAI wire models the gateway accepts (chat, completions, Responses API, tools and response_format).

Below both `api` (which parses HTTP bodies into them) and `serving` (which runs them), so serving never imports api.
"""
