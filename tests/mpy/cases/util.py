"""Helpers shared by the case modules (portable: no pytest, no unittest)."""


def raises(exc, fn, *args, **kw):
    """Call fn and return the exception, which must be an instance of exc."""
    try:
        fn(*args, **kw)
    except exc as e:
        return e
    raise AssertionError("%s did not raise %s" % (getattr(fn, "__name__", fn), exc.__name__))


def read(ctx, name):
    with open(ctx["vec"] + "/" + name, "rb") as f:
        return f.read()


def write(ctx, name, data):
    with open(ctx["out"] + "/" + name, "wb") as f:
        f.write(data)


def fresh_dir(path):
    """Empty (or create) a directory for a storage test."""
    import os

    try:
        for f in os.listdir(path):
            os.remove(path + "/" + f)
    except OSError:
        os.mkdir(path)
    return path
