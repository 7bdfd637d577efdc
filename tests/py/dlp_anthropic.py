"""The real Anthropic Python SDK through latchkey (explicit proxy, the latchkey CA bundle,
only a placeholder key), sending a prompt that pastes a .env file. Prints the answer's
text, or `error STATUS` and the error body.

usage: PROXY=... BUNDLE=... ENV_FILE=... dlp_anthropic.py
"""
import os

import anthropic

env = open(os.environ["ENV_FILE"]).read()
client = anthropic.Anthropic(
    api_key="latchkey-anthropic",
    base_url="https://api.anthropic.com",
    http_client=anthropic.DefaultHttpxClient(proxy=os.environ["PROXY"], verify=os.environ["BUNDLE"], trust_env=False),
    max_retries=0,
)
try:
    msg = client.messages.create(
        model="claude-test",
        max_tokens=64,
        messages=[
            {"role": "user", "content": "Why does my deploy fail? Here is my .env:\n" + env},
            {"role": "assistant", "content": "Let me look."},
            {"role": "user", "content": "Thanks."},
        ],
    )
    print(msg.content[0].text)
except anthropic.APIStatusError as e:
    print("error", e.status_code)
    print(e.response.headers.get("x-latchkey-error"))
    print(e.response.text)
