"""citron_client: runner, backend and front clients of the citron protocol."""
