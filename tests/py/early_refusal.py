"""A real client reading an early refusal: Python requests (urllib3) sends a body
latchkey refuses before reading it (413, 403) or a head over the limit (431), through
latchkey as its proxy, and prints what it got as JSON: the status and X-Latchkey-Error,
or the exception when the connection was reset under it.

usage: PROXY=http://127.0.0.1:PORT BUNDLE=ca.pem early_refusal.py METHOD URL BODY_BYTES HEADER_BYTES
"""
import json
import os
import sys

import requests

method, url, body_bytes, header_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
proxy = os.environ["PROXY"]
headers = {"X-Big": "a" * header_bytes} if header_bytes else {}
data = b"x" * body_bytes if body_bytes else None
try:
    r = requests.request(
        method,
        url,
        data=data,
        headers=headers,
        proxies={"http": proxy, "https": proxy},
        verify=os.environ["BUNDLE"],
        timeout=30,
    )
    print(json.dumps({"status": r.status_code, "kind": r.headers.get("x-latchkey-error"), "body": r.text[:300]}))
except Exception as e:  # the failure is the finding: print it for the test to show
    print(json.dumps({"error": repr(e)}))
