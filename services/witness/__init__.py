"""Our C2SP tlog-witness (`cvl witness serve`): cosigns a log's checkpoint only after checking it extends the last
one it cosigned for that log (see server.py)."""
