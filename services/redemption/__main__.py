from services.common import http, logs, settings

from .app import create_app

if __name__ == "__main__":
    logs.setup("redemption")
    http.serve(settings.load("redemption"), create_app)
