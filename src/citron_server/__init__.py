"""citron_server: the citron coordination server, hosting the sans-IO hub of
:mod:`citron_protocol` over websockets or aiohttp."""
