"""Precomputed latents and text features: the on-disk format, the run-config check, and the reader.

`python -m lens_jax.data.precompute` (lens_jax/data/precompute.py) writes, once, for every record of
a split: the packed, normalised codec latents of its image at its bucket, and the selected-layer
text-encoder features of BOTH its captions (dense and short), so that every caption mode
('dense' | 'short' | 'mix') trains from the same files. A run reads them with

    --config.data.source=precomputed --config.data.dir=OUT

and then neither decodes images nor runs the frozen encoders in its train step.

Layout of OUT::

    OUT/plan.json        the job's parameters (fingerprint, buckets, dtypes, shard plan); written
                         first, so a restart with other parameters is refused instead of mixed in
    OUT/<split>/<W>x<H>/<i:05d>-of-<n:05d>.array_record   (see bucket_shards)
                         shard i of the bucket: the bucket's records at positions
                         [i * records_per_shard, (i + 1) * records_per_shard) of the bucket's member
                         list (records in source order), one ArrayRecord record each (one record
                         per group, zstd); written under a temporary name and renamed when complete
    OUT/manifest.json    the plan plus per-shard record counts and statistics; written LAST: its
                         presence marks a complete precompute, and the reader needs it

Each record is a msgpack map::

    pos      int    the record's position in the split (the raw pipeline's source index)
    key      int    the record's `index` feature (-1 when it has none): the caption choice uses it
    valid    bool   False for a corrupt / unreadable image (its latents are empty)
    reason   str    why it is invalid ('' when valid)
    latents  bytes  [h, w, C] in manifest["latents_dtype"] (float32, or bfloat16 bit patterns)
    dense, short    {present: bool (the caption is a non-empty text), tokens: int (tokens before the
                    offset, after truncation to data.max_text_len), n: int (feature rows kept: the
                    tokens after the offset), hidden: bytes [n, L, D] in manifest["features_dtype"]}

Variable-length features are stored without padding; the reader pads them to
data.max_text_len - text_encoder.offset rows with a false mask, exactly what the on-the-fly path
(`lens_jax.text.features.text_features`) gives for right-padded token ids.

The reader walks the same global order as `pipeline.make_train_dataset` (same buckets, same
per-bucket shuffle seeds, same repeat / batch / per-process rows, same weighted mix) and chooses
each record's caption with the same function (`pipeline.caption_field`), so a precomputed batch
holds the same examples as the raw batch of the same step. Batches::

    latents      float32 (or bfloat16) [b, h, w, C]
    text_hidden  bfloat16 (or float32) [b, max_text_len - offset, L, D]
    text_mask    bool    [b, max_text_len - offset]
    valid        float32 [b]   0 for a corrupt image or a missing / empty chosen caption

A run refuses precomputed data made with another tokenizer, text encoder (config, offset,
weights), codec (kind, patch / VAE config, weights), bucket list or max_text_len, naming the config
field: its sample grids encode prompts and decode latents with the run's own encoder and codec, so
they must be the ones that made the features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib

import grain
import ml_dtypes
import msgpack
import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
KINDS = ("dense", "short")
CAPTION_FIELDS = {"dense": "dense_caption", "short": "short_caption"}
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


# --------------------------------------------------------------------------------------------------
# Fingerprint: what made the features (compared field by field with a run's config)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's definition (vocabulary, merges, normalisation, special tokens)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    for k in ("truncation", "padding"):  # run-time state, not the tokenizer
        spec.pop(k, None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(weights: str, seed: int, field: str) -> dict:
    """Identifies frozen weights cheaply: seeded random ({random_seed}) or a directory.

    A converted directory that holds seeded random weights (the copy a training run saves into its
    workdir) counts as those seeded weights. Any other directory: sha256 of its marker file and of
    the relative path and size of every file (the weights are not read).
    """
    if not weights:
        return {"random_seed": int(seed)}
    from lens_jax.convert.checkpoint_io import MARKER, is_converted, read_meta

    path = pathlib.Path(weights).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"config.{field}: {path} does not exist")
    if is_converted(path):
        source = read_meta(path).get("source") or {}
        if source.get("format") == "random" and "seed" in source:
            return {"random_seed": int(source["seed"])}
    h = hashlib.sha256()
    if (path / MARKER).is_file():
        h.update((path / MARKER).read_bytes())
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f"{f.relative_to(path)}:{f.stat().st_size}\n".encode())
    return {"files_sha256": h.hexdigest()[:16]}


def fingerprint(cfg, tokenizer) -> dict:
    """The run-config fields the precomputed features depend on, keyed by their config path."""
    from lens_jax.convert.keys_gpt_oss import model_fields
    from lens_jax.data import buckets as buckets_lib
    from lens_jax.models.codec import flux2_vae_config
    from lens_jax.text.encoder import encoder_config

    enc = encoder_config(cfg.text_encoder)
    model = model_fields(enc)
    model.update(selected_layers=list(enc.selected_layers), dtype=enc.dtype)
    fp = {
        "data.buckets": buckets_lib.format_sizes(buckets_lib.parse_sizes(cfg.data.buckets, field="data.buckets")),
        "data.max_text_len": int(cfg.data.max_text_len),
        "text_encoder.tokenizer": tokenizer_fingerprint(tokenizer),
        "text_encoder.model": model,
        "text_encoder.offset": int(cfg.text_encoder.offset),
        "text_encoder.weights": weights_fingerprint(cfg.text_encoder.weights, cfg.text_encoder.seed,
                                                    "text_encoder.weights"),
        "codec.kind": str(cfg.codec.kind),
    }
    if cfg.codec.kind == "flux2":
        fp["codec.vae"] = flux2_vae_config(cfg.codec).to_dict()
        fp["codec.weights"] = weights_fingerprint(cfg.codec.weights, cfg.codec.seed, "codec.weights")
    else:
        fp["codec.patch"] = int(cfg.codec.patch)
    return json.loads(json.dumps(fp))  # tuples -> lists, as read back from JSON


_HINT = {
    "text_encoder.weights": "text_encoder.weights / text_encoder.seed",
    "codec.weights": "codec.weights / codec.seed",
    "text_encoder.tokenizer": "text_encoder.tokenizer",
}


def fingerprint_mismatches(made: dict, run: dict) -> list[str]:
    """Human-readable differences, each naming the config field."""
    out = []
    for field in sorted(set(made) | set(run)):
        a, b = made.get(field), run.get(field)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and field in ("text_encoder.model", "codec.vae"):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    out.append(f"config.{field}.{sub}: precomputed with {a.get(sub)!r}, this run has {b.get(sub)!r}")
        else:
            out.append(f"config.{_HINT.get(field, field)}: precomputed with {a!r}, this run has {b!r}")
    return out


# --------------------------------------------------------------------------------------------------
# Records


def encode_record(*, pos: int, key: int, valid: bool, reason: str, latents: np.ndarray | None,
                  captions: dict[str, dict], latents_dtype: str, features_dtype: str) -> bytes:
    """One record's bytes. `captions[kind]` = {present, tokens, hidden [n, L, D]}."""
    rec = {
        "pos": int(pos), "key": int(key), "valid": bool(valid), "reason": str(reason),
        "latents": b"" if latents is None else np.ascontiguousarray(latents, DTYPES[latents_dtype]).tobytes(),
    }
    for kind in KINDS:
        c = captions[kind]
        hidden = np.ascontiguousarray(c["hidden"], DTYPES[features_dtype])
        rec[kind] = {"present": bool(c["present"]), "tokens": int(c["tokens"]), "n": int(hidden.shape[0]),
                     "hidden": hidden.tobytes()}
    return msgpack.packb(rec, use_bin_type=True)


def decode_record(raw: bytes, *, latent_shape, text_dims, latents_dtype: str, features_dtype: str) -> dict:
    """Inverse of encode_record: latents [h, w, C] (None when invalid), hidden [n, L, D] per kind."""
    rec = msgpack.unpackb(raw, raw=False)
    lat = rec["latents"]
    rec["latents"] = np.frombuffer(lat, DTYPES[latents_dtype]).reshape(latent_shape) if lat else None
    L, D = text_dims
    for kind in KINDS:
        c = rec[kind]
        c["hidden"] = np.frombuffer(c["hidden"], DTYPES[features_dtype]).reshape(c["n"], L, D)
    return rec


def bucket_name(size) -> str:
    w, h = size
    return f"{int(w)}x{int(h)}"


def shard_file(split: str, size, i: int, n: int) -> str:
    return f"{split}/{bucket_name(size)}/{i:05d}-of-{n:05d}.array_record"


def bucket_shards(split: str, size, num_records: int, records_per_shard: int) -> list[dict]:
    """The shards of a bucket: [{file, start, stop}], record positions [start, stop) of its member list."""
    n, r = int(num_records), int(records_per_shard)
    k = -(-n // r)
    return [{"file": shard_file(split, size, i, k), "start": i * r, "stop": min(n, (i + 1) * r)} for i in range(k)]


# --------------------------------------------------------------------------------------------------
# Manifest and the run-config check


def read_manifest(directory) -> dict:
    path = pathlib.Path(directory).expanduser() / MANIFEST
    if not path.is_file():
        hint = (" (the precompute has not finished: run it again to complete it)"
                if (path.parent / PLAN).is_file() else "")
        raise FileNotFoundError(f"data.dir: {path.parent} holds no precomputed data ({MANIFEST} missing){hint}; "
                                f"write it with python -m lens_jax.data.precompute --out DIR")
    manifest = json.loads(path.read_text())
    if int(manifest.get("format_version", 0)) != FORMAT_VERSION:
        raise ValueError(f"data.dir: {path} has format_version {manifest.get('format_version')}, this lens_jax "
                         f"reads {FORMAT_VERSION}; precompute again")
    return manifest


def check_run_config(cfg, tokenizer, manifest: dict | None = None) -> dict:
    """Raise ValueError naming every config field whose value differs from the one the precomputed
    data in cfg.data.dir was made with; returns the manifest."""
    manifest = read_manifest(cfg.data.dir) if manifest is None else manifest
    problems = fingerprint_mismatches(manifest["fingerprint"], fingerprint(cfg, tokenizer))
    if problems:
        raise ValueError(
            f"the precomputed data in {cfg.data.dir} was made with another configuration; this run's sample "
            f"grids and any later sampling would not use the encoder / codec that made the features. "
            + "; ".join(problems)
            + ". Use the config the precompute was run with (its fields are in "
            f"{pathlib.Path(cfg.data.dir) / MANIFEST}, 'fingerprint'), or precompute again.")
    return manifest


def source_data_config(directory):
    """The data section of the raw dataset the precompute read (for eval examples and sample prompts)."""
    import ml_collections

    return ml_collections.ConfigDict(read_manifest(directory)["data"])


# --------------------------------------------------------------------------------------------------
# The reader


class PrecomputedToExample:
    """One precomputed record -> one training example (deterministic, thread-safe).

    The caption kind is chosen exactly as `pipeline.RecordToExample` chooses the caption text.
    """

    def __init__(self, *, epoch_len: int, settings, seed: int, latent_shape, text_shape,
                 latents_dtype: str, features_dtype: str):
        self.epoch_len = max(1, int(epoch_len))
        self.caption = settings.caption
        self.dense_ratio = settings.dense_ratio
        self.seed = int(seed)
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.text_shape = tuple(int(v) for v in text_shape)  # (T, L, D)
        self.latents_dtype, self.features_dtype = latents_dtype, features_dtype

    def invalid(self, key: int, reason: str) -> dict[str, np.ndarray]:
        from lens_jax.data import pipeline

        n = next(pipeline._INVALID_COUNT) + 1
        if n <= 10 or n % 1000 == 0:
            log.warning("data: record %d is invalid (%s); it gets valid=0 (%d invalid records so far)", key, reason, n)
        T = self.text_shape[0]
        return {
            "latents": np.zeros(self.latent_shape, DTYPES[self.latents_dtype]),
            "text_hidden": np.zeros(self.text_shape, DTYPES[self.features_dtype]),
            "text_mask": np.zeros((T,), bool),
            "valid": np.float32(0.0),
        }

    def __call__(self, index: int, raw: bytes) -> dict[str, np.ndarray]:
        from lens_jax.data.pipeline import caption_field

        rec = decode_record(raw, latent_shape=self.latent_shape, text_dims=self.text_shape[1:],
                            latents_dtype=self.latents_dtype, features_dtype=self.features_dtype)
        key = int(rec["key"])
        epoch = int(index) // self.epoch_len
        field = caption_field(self.caption, self.dense_ratio, self.seed,
                              key if key >= 0 else int(index) % self.epoch_len, epoch)
        cap = rec["dense" if field == "dense_caption" else "short"]
        # The same checks, in the same order, as RecordToExample.
        if not cap["present"]:
            return self.invalid(key, "missing or empty caption")
        if not rec["valid"]:
            return self.invalid(key, rec["reason"] or "corrupt or unreadable image")
        if cap["tokens"] <= 0:
            return self.invalid(key, "caption has no tokens")
        T = self.text_shape[0]
        n = min(int(cap["n"]), T)
        hidden = np.zeros(self.text_shape, DTYPES[self.features_dtype])
        hidden[:n] = cap["hidden"][:n]
        mask = np.zeros((T,), bool)
        mask[:n] = True
        return {"latents": np.array(rec["latents"]), "text_hidden": hidden, "text_mask": mask,
                "valid": np.float32(1.0)}


def check_data_settings(settings, manifest: dict, directory) -> None:
    """The data fields a run must share with the precompute (before the full config check)."""
    from lens_jax.data import buckets as buckets_lib

    made = manifest["fingerprint"]
    run = {"data.buckets": buckets_lib.format_sizes(settings.buckets), "data.max_text_len": settings.max_text_len}
    problems = fingerprint_mismatches({k: made[k] for k in run}, run)
    if problems:
        raise ValueError(f"the precomputed data in {directory} does not match this run's data config: "
                         + "; ".join(problems))


def make_train_dataset(settings, tokenizer, *, global_batch_size: int, seed: int, process_index: int,
                       process_count: int, split: str = "train") -> grain.IterDataset:
    """The precomputed counterpart of `pipeline.make_train_dataset` (arguments already validated there)."""
    from lens_jax.data.pipeline import bucket_batches, mix_buckets

    directory = pathlib.Path(settings.dir).expanduser().absolute()
    manifest = read_manifest(directory)
    check_data_settings(settings, manifest, directory)
    if tokenizer is not None:
        made, run = manifest["fingerprint"]["text_encoder.tokenizer"], tokenizer_fingerprint(tokenizer)
        if made != run:
            raise ValueError(f"config.text_encoder.tokenizer: the precomputed data in {directory} was tokenized "
                             f"with another tokenizer ({made} vs this run's {run})")
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} was not precomputed in {directory} (has {sorted(manifest['splits'])}); "
                         f"run the precompute with --splits {split}")
    info = manifest["splits"][split]["buckets"]
    local_batch = global_batch_size // process_count
    datasets, weights = [], []
    for b, size in enumerate(settings.buckets):
        entry = info.get(bucket_name(size))
        if entry is None or settings.weights[b] <= 0 or entry["num_records"] == 0:
            continue
        files = [str(directory / s["file"])
                 for s in bucket_shards(split, size, entry["num_records"], manifest["records_per_shard"])]
        source = grain.sources.ArrayRecordDataSource(files)
        if len(source) != entry["num_records"]:
            raise ValueError(f"data.dir: {directory} bucket {bucket_name(size)} of split {split} holds "
                             f"{len(source)} records, its manifest says {entry['num_records']}")
        fn = PrecomputedToExample(epoch_len=len(source), settings=settings, seed=seed,
                                  latent_shape=manifest["latent_shapes"][bucket_name(size)],
                                  text_shape=manifest["text_shape"], latents_dtype=manifest["latents_dtype"],
                                  features_dtype=manifest["features_dtype"])
        datasets.append(bucket_batches(source, fn, seed=seed, bucket_id=b, local_batch=local_batch,
                                       process_index=process_index, process_count=process_count))
        weights.append(settings.weights[b])
    if not datasets:
        raise ValueError(f"data.buckets: no bucket with positive weight holds precomputed records in {directory}")
    return mix_buckets(datasets, weights, settings)

__all__ = [
    "FORMAT_VERSION", "MANIFEST", "PLAN", "KINDS", "PrecomputedToExample", "check_run_config", "decode_record",
    "encode_record", "fingerprint", "fingerprint_mismatches", "make_train_dataset", "read_manifest",
    "source_data_config", "tokenizer_fingerprint", "weights_fingerprint",
]
