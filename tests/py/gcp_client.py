"""A real Google client library (google-auth + requests) as the agent runs it under
`latchkey exec`: Application Default Credentials point at latchkey's stub."""
import json

import google.auth
from google.auth.transport.requests import AuthorizedSession

credentials, _ = google.auth.default()
session = AuthorizedSession(credentials)
response = session.get("https://storage.googleapis.com/v1/whoami")
print(json.dumps({"status": response.status_code, "api": response.json(), "library_token": credentials.token}))
