"""`sdvae cache-latents --engine ray`: the same per-unit work (sdvae.cache.build_cache on one unit at a time), mapped
over the input's units by Ray Data, with one VAE per actor (a GPU each where the cluster has GPUs). Claims and
completion records are the ones every other engine uses, so a Ray job, torchrun ranks and plain invocations can
share one --out, and a rerun does what is left. Needs `pip install 'sdvae[ray]'`; RAY_ADDRESS (or --ray-address)
names a running cluster, else a local one is started.
"""
from __future__ import annotations

import dataclasses

from .cache import CacheSettings, build_cache, default_device
from .codec import load_vae
from .inputs import list_units


class _UnitEncoder:
    """A Ray Data actor: loads the VAE once, then encodes the units it is handed."""

    def __init__(self, vae: str, data, out: str, settings: CacheSettings):
        self.data, self.out, self.settings = data, out, settings
        self.codec = load_vae(vae, settings.device or default_device(), settings.dtype, backend=settings.backend)

    def __call__(self, batch: dict) -> dict:
        names = [str(name) for name in batch["unit"]]
        report = build_cache(self.codec, self.data, self.out, self.settings, progress=False, only=names)
        return {"unit": names, **{k: [report[k]] * len(names) for k in COUNTS}}


COUNTS = ("encoded", "encoded_units", "skipped")


def build_cache_ray(vae: str, data, out, settings: CacheSettings, actors: int | None = None,
                    address: str | None = None) -> dict:
    """Every unit through Ray Data's actor pool, then the manifest; returns the last report (as build_cache's)."""
    try:
        import ray
    except ImportError:
        raise ImportError("--engine ray needs Ray Data: pip install 'sdvae[ray]'") from None
    if actors is not None and actors < 1:
        raise ValueError(f"--ray-actors must be at least 1, got {actors}")
    units = list_units(data, settings.shard_size, settings.image_column, settings.split)
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    pool = actors or max(1, gpus)
    encoder = dict(num_gpus=1) if gpus else dict(num_cpus=max(1, int(ray.cluster_resources().get("CPU", 1)) // pool))
    rows = ray.data.from_items([{"unit": u.name} for u in units], override_num_blocks=max(1, len(units)))
    done = rows.map_batches(_UnitEncoder, fn_constructor_args=(vae, data, str(out), settings), batch_size=1,
                            concurrency=pool, **encoder).take_all()
    # the driver finishes what Ray left (a unit another process held) and writes the manifest
    report = build_cache(vae, data, out, dataclasses.replace(settings, num_workers=0), progress=False)
    for count in COUNTS:  # each actor's batch is one unit: its report counts that unit alone
        report[count] += sum(row[count] for row in done)
    report["reused_units"] = report["units"] - report["encoded_units"] - report["busy_units"]
    report["ray_actors"] = pool
    return report
