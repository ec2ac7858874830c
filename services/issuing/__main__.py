import gc

from services.common import http, logs, settings

from .app import create_app

# The cyclic garbage collector, tuned for a process that allocates thousands of short-lived objects per mint batch
# (structs, rows, tuples) that reference counting frees: a young generation collected every GC_YOUNG_OBJECTS
# allocations rather than 700 (fewer passes over a batch that is still alive), and the objects made at import
# (modules, classes, schemas) frozen out of the full collections, which otherwise walk all of them every time.
GC_YOUNG_OBJECTS = 50_000

if __name__ == "__main__":
    logs.setup("issuing")
    gc.set_threshold(GC_YOUNG_OBJECTS, *gc.get_threshold()[1:])
    gc.freeze()
    http.serve(settings.load("issuing"), create_app)
