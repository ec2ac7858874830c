"""Every message of the public contract as a msgspec Struct: requests, responses, errors and events.

One definition serves validation at the edge, the OpenAPI documents and the JSON Schemas in `schemas/json/`.
"""
