"""Drives a Veil router with the official `openai` Python client (from PyPI).

Usage: python3 openai_client.py BASE_URL API_KEY MODEL
Prints one JSON object: the plain completion's text and usage, and the streamed text and
number of content chunks. Exits non-zero on any error.
"""
import json
import sys

from openai import OpenAI

base_url, api_key, model = sys.argv[1:4]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)

plain = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "hello from the openai client"}],
    max_tokens=10,
    seed=7,
)
streamed_text = ""
chunks = 0
finish = None
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "hello from the openai client"}],
    max_tokens=10,
    seed=7,
    stream=True,
):
    if chunk.choices:
        delta = chunk.choices[0].delta.content
        if delta:
            streamed_text += delta
            chunks += 1
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason

print(json.dumps({
    "text": plain.choices[0].message.content,
    "finish_reason": plain.choices[0].finish_reason,
    "completion_tokens": plain.usage.completion_tokens,
    "id": plain.id,
    "stream_text": streamed_text,
    "stream_chunks": chunks,
    "stream_finish": finish,
}))
