"""`python -m gateway`: the gateway under uvicorn, configured by GATEWAY_CONFIG (a YAML/JSON file) and
GATEWAY_<FIELD> variables (gateway/settings.py). Every tenant's tool set is loaded before it listens."""

from __future__ import annotations

import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings.load()
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                timeout_graceful_shutdown=int(settings.deadline_s))


if __name__ == "__main__":
    main()
