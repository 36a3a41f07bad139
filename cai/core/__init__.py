"""Plumbing under the method: errors, records and files, configs, model specs, stages and
the Ray pool. Nothing here knows about constitutions, judges or training."""
