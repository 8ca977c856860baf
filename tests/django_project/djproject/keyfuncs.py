"""A KEY_FUNCTION for the ``custom_key`` aliases (by object and by dotted path)."""


def custom_key_func(key: str, key_prefix: str, version: int) -> str:
    """Another spelling of the key than Django's ``prefix:version:key``."""
    return f"CUSTOM-{key_prefix}-{version}-{key}"
