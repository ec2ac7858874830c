from services.common import http, logs, settings

from .app import create_app

if __name__ == "__main__":
    logs.setup("ledger")
    http.serve(settings.load("ledger"), create_app)
