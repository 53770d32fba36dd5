"""One module per notebook stage: auth, preflight, modeling, hardware, data, train, publish. Built on settings and
io."""
