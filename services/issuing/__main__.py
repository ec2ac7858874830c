from services.common import http, logs, settings

from .app import create_app

if __name__ == "__main__":
    logs.setup("issuing")
    http.serve(settings.load("issuing"), create_app)
