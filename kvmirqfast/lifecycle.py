"""What every VM object (either backend) does about its lifetime: ``with`` closes it, so does
the garbage collector, and ``closed`` says whether it is."""


class Closing:
    """Mixin for a class with ``close()`` (idempotent) and a ``_closed`` flag."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:        # a half-built object, or interpreter shutdown: nothing to do
            pass

    @property
    def closed(self):
        return self._closed
