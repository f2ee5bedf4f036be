"""ttc-gateway: an OpenAI-compatible gateway that spends test-time compute optimally."""
