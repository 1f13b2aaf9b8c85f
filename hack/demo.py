"""``make demo``: train two methods, compare them, serve both, on the embedded local cluster.

1. starts a local Kubernetes (etcd, apiserver, controller-manager, scheduler, a node agent that
   runs every pod as a real container with podman);
2. installs the CRDs, then the operator with the Helm chart from the images `make images` built
   (the operator, the workers and the server each run as a container of those images), in the
   background while the data is put in place;
3. puts a small Llama-architecture base model and a task on a PersistentVolumeClaim. The base was
   pretrained (here, once, then cached) on a letter cipher where ``encode`` usually shifts each
   letter by two; the task asks for a shift by one. Fine-tuning does what it does for real models:
   it steers a skill the base has toward what this data wants;
4. applies a LoRA and a bottleneck-adapter FineTuneJob labelled as one comparison, and the
   AdapterDeployment that will serve both (its server loads the base while they train; the
   operator hot-loads each adapter when its job succeeds), and follows them, one line each;
5. asks the base and each adapter the same questions over the OpenAI-compatible API, and checks
   every adapter answer (exit status 1 if one is wrong);
6. prints ``kubetune compare``'s table for the two runs (with the serving latency, once measured)
   and writes its plot;
7. stops the cluster (``--keep`` leaves it running until Ctrl-C) and says what is left to clean up.

Nothing is downloaded: the model is built from a config and its data is generated.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client

from kubetune import compare
from kubetune.api import crdgen, v1alpha1
from kubetune.localcluster.binaries import cache_dir
from kubetune.localcluster.controlplane import ClusterOptions, LocalCluster, NodeOptions
from kubetune.localcluster.testing import BuiltImages, ClusterHandle, wait_for

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "demo"
COMPARISON = "cipher"
SELECTOR = f"kubetune.dev/compare={COMPARISON}"
OUT = ROOT / "_out" / "demo"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD_LENGTH = 5
#: The task: encode shifts by one. The base learned encode as mostly a shift by two.
TASK_SHIFT, BASE_SHIFT, BASE_SHIFT_SHARE = 1, 2, 0.7
QUESTIONS = ("hello", "world", "tunes")
#: Changing anything that shapes the pretrained base must change this, so the cache is rebuilt.
BASE_RECIPE: dict[str, Any] = {
    "version": 2,
    "size": "tiny",
    "word_length": WORD_LENGTH,
    "shifts": [BASE_SHIFT, TASK_SHIFT],
    "share": BASE_SHIFT_SHARE,
    "batch": 32,
    "lr": 3e-3,
    "seed": 0,
}

# The two methods of the comparison: name -> (method block, learning rate). LoRA adds low-rank
# updates to every projection; bottleneck adapters (kubetune's own method) add small MLPs after
# attention and MLP. IA3's scaling vectors were tried and do not flip the base's habit in 120 steps
# (7 and 11 of 20 words right at learning rates 0.3 and 0.1), which is the point of comparing.
METHODS: dict[str, tuple[dict[str, Any], float]] = {
    "cipher-lora": ({"type": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}}, 5e-3),
    "cipher-adapter": ({"type": "adapter"}, 3e-3),
}


class Timeline:
    """Seconds since the demo started at each named moment, printed at the end: where a run's time
    went (cluster start, operator, each job's phases, serving), so a slow run says why."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.marks: list[tuple[str, float]] = []
        self.seen: set[str] = set()

    def mark(self, what: str) -> None:
        self.marks.append((what, time.monotonic() - self.started))

    def once(self, what: str) -> None:
        if what not in self.seen:
            self.seen.add(what)
            self.mark(what)

    def report(self) -> str:
        lines, previous = [], 0.0
        for what, at in self.marks:
            lines.append(f"  {at:6.1f} s  (+{at - previous:5.1f})  {what}")
            previous = at
        return "\n".join(lines)


TIMELINE = Timeline()


def say(text: str) -> None:
    TIMELINE.mark(text)
    print(f"\n==> {text}", flush=True)


def encode(word: str, shift: int) -> str:
    return " ".join(LETTERS[(LETTERS.index(c) + shift) % 26] for c in word)


def prompt(word: str) -> str:
    return f"encode : {' '.join(word)} :"


# ------------------------------------------------------------------------------------- base and data


def pretrained_base(cache: Path) -> Path:
    """The base model, pretrained on the cipher mixture; built once per recipe and cached."""
    target = cache / f"demo-base-v{BASE_RECIPE['version']}"
    recipe = json.dumps(BASE_RECIPE, sort_keys=True)
    if (target / "demo-recipe.json").is_file() and (target / "demo-recipe.json").read_text() == recipe:
        return target
    print(f"pretraining the base model once (cached in {target}); later runs skip this", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.worker.testing import make_tiny_model

    staging = target.with_name(target.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    make_tiny_model(staging, size=BASE_RECIPE["size"], seed=BASE_RECIPE["seed"])
    tokenizer = AutoTokenizer.from_pretrained(staging)
    model = AutoModelForCausalLM.from_pretrained(staging)
    # One thread: the same numbers on every machine, whatever its core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = random.Random(BASE_RECIPE["seed"])

    def word(source: random.Random) -> str:
        return "".join(source.choice(LETTERS) for _ in range(source.randint(WORD_LENGTH, WORD_LENGTH)))

    def example(shift: int) -> tuple[list[int], list[int]]:
        asked = word(rng)
        question = tokenizer(prompt(asked))["input_ids"]
        answer = tokenizer(encode(asked, shift), add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        return question + answer, [-100] * len(question) + answer

    held_out_rng = random.Random(99)
    held_out = [word(held_out_rng) for _ in range(20)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=BASE_RECIPE["lr"])
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))
    model.train()
    for step in range(3000):
        pairs = [
            example(BASE_SHIFT if rng.random() < BASE_RECIPE["share"] else TASK_SHIFT)
            for _ in range(BASE_RECIPE["batch"])
        ]
        ids, labels = (torch.tensor([pair[i] for pair in pairs]) for i in (0, 1))  # one length: no padding
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        optimizer.zero_grad()
        if step % 250 == 0:
            right = sum(answer(model, tokenizer, w) == encode(w, BASE_SHIFT) for w in held_out)
            print(
                f"  step {step}: encodes {right}/{len(held_out)} held-out words (shift {BASE_SHIFT})",
                flush=True,
            )
            model.train()
            if right >= len(held_out) - 1:
                break
    torch.set_num_threads(threads)
    model.save_pretrained(staging)
    for path in staging.iterdir():
        path.chmod(0o644)  # the workers that read it run as another user
    (staging / "demo-recipe.json").write_text(recipe)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def answer(model: Any, tokenizer: Any, word: str) -> str:
    import torch

    model.eval()
    ids = tokenizer(prompt(word), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=WORD_LENGTH + 1, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return " ".join(tokenizer.decode(out[0][ids.shape[1] :], skip_special_tokens=True).split())


def task_records(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    words = ("".join(rng.choice(LETTERS) for _ in range(WORD_LENGTH)) for _ in range(count))
    return [{"prompt": prompt(w), "completion": encode(w, TASK_SHIFT)} for w in words]


# ---------------------------------------------------------------------------------------- manifests

#: One torch thread per pod, matching its 1-CPU limit. The worker sizes its threads from a cgroup v2
#: quota; on a cgroup v1 node (this project's machine) it sees no quota and starts one thread per
#: core, and the CFS quota then throttles the threads against each other: 60 steps took 43 s in a
#: 1-CPU container with two threads and 8 s with one (podman, load 10).
ONE_THREAD: dict[str, Any] = {"env": [{"name": "OMP_NUM_THREADS", "value": "1"}]}


def finetunejob(name: str, method: dict[str, Any], learning_rate: float, steps: int) -> dict[str, Any]:
    return {
        "apiVersion": v1alpha1.API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"kubetune.dev/compare": COMPARISON}},
        "spec": {
            "model": {"uri": "pvc://data/base"},
            "dataset": {"uri": "pvc://data/cipher.jsonl", "format": "completion", "evalFraction": 0.05},
            "method": method,
            "training": {
                "maxSteps": steps,
                "batchSize": 16,
                "learningRate": learning_rate,
                "maxSeqLength": 32,
                "checkpointEverySteps": steps,
            },
            "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "2Gi"},
            "output": {"uri": f"pvc://data/adapters/{name}"},
            "podTemplate": ONE_THREAD,
        },
    }


def adapterdeployment() -> dict[str, Any]:
    return {
        "apiVersion": v1alpha1.API_VERSION,
        "kind": "AdapterDeployment",
        "metadata": {"name": "cipher", "namespace": NAMESPACE},
        "spec": {
            "model": {"uri": "pvc://data/base"},
            "adapters": [{"name": name, "fineTuneJob": name} for name in METHODS],
            "resources": {"cpu": "1", "memory": "2Gi"},
            "podTemplate": ONE_THREAD,
        },
    }


def get(api: client.CustomObjectsApi, plural: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = api.get_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, NAMESPACE, plural, name
    )
    return result


# ------------------------------------------------------------------------------------------ display


class JobLines:
    """One line per job: rewritten in place on a terminal; otherwise printed when it changes phase
    or passes a quarter of its steps, so a log gets a few lines per job, not one per poll."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.tty = sys.stdout.isatty()
        self.drawn = 0  # lines drawn on the terminal, to move back over
        self.last: dict[str, tuple[str, int]] = {}
        self.printed: set[str] = set()

    @staticmethod
    def line(name: str, obj: dict[str, Any]) -> tuple[str, str, int]:
        status = obj.get("status") or {}
        phase = status.get("phase") or "Pending"
        progress = status.get("progress") or {}
        step, total = progress.get("step") or 0, progress.get("totalSteps") or 0
        bar = ""
        if total:
            filled = int(20 * step / total)
            bar = f"[{'#' * filled}{'.' * (20 - filled)}] {step}/{total}"
        loss = progress.get("loss")
        text = f"  {name:16} {obj['spec']['method']['type']:8} {phase:10} {bar:30}"
        if loss is not None:
            text += f" loss {loss:.3f}"
        if phase == "Running" and progress.get("etaSeconds"):
            text += f"  eta {progress['etaSeconds']}s"
        if phase == "Failed":
            failed = next((c for c in status.get("conditions") or [] if c["type"] == "Failed"), {})
            text += f" {failed.get('reason')}: {failed.get('message')}"
        quarter = int(4 * step / total) if total else 0
        return text, phase, quarter

    def show(self, objects: dict[str, dict[str, Any]], extra: Sequence[str] = ()) -> None:
        """Draw one line per job and then the ``extra`` lines (other objects' one-line states)."""
        lines = {name: self.line(name, objects[name]) for name in self.names}
        if self.tty:
            if self.drawn:
                sys.stdout.write(f"\x1b[{self.drawn}F")  # back to the first job's line
            texts = [text for text, _, _ in lines.values()] + list(extra)
            for text in texts:
                sys.stdout.write(f"\x1b[2K{text}\n")
            self.drawn = len(texts)
        else:
            for name, (text, phase, quarter) in lines.items():
                if self.last.get(name) != (phase, quarter):
                    print(text)
                    self.last[name] = (phase, quarter)
            for text in extra:
                if text not in self.printed:
                    print(text)
                    self.printed.add(text)
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------- run


def serving_line(obj: dict[str, Any] | None) -> str:
    status = (obj or {}).get("status") or {}
    phase = status.get("phase") or "Pending"
    text = f"  {'cipher':16} {'serving':8} {phase:10} adapters {status.get('adaptersReady') or '0/2'}"
    if phase == "Failed" or phase == "Degraded":
        text += f" {status.get('message') or ''}"
    return text


def follow_training(custom: client.CustomObjectsApi, installing: Future[Any]) -> None:
    """Follow both jobs (and the server, which starts meanwhile) until both jobs have finished."""
    names = list(METHODS)
    display = JobLines(names)
    deadline = time.monotonic() + 1800
    while True:
        if installing.done() and installing.exception() is not None:
            raise SystemExit(f"installing the operator failed: {installing.exception()}")
        objects = {name: get(custom, "finetunejobs", name) for name in names}
        display.show(objects, [serving_line(get(custom, "adapterdeployments", "cipher"))])
        for name, obj in objects.items():
            status = obj.get("status") or {}
            TIMELINE.once(f"{name}: {status.get('phase') or 'Pending'}")
            if ((status.get("progress") or {}).get("step") or 0) > 0:
                TIMELINE.once(f"{name}: first step reported")
        phases = {(o.get("status") or {}).get("phase") for o in objects.values()}
        if phases <= {"Succeeded", "Failed"}:
            break
        if time.monotonic() > deadline:
            raise SystemExit("training did not finish in 30 minutes")
        time.sleep(1)
    failed = [name for name, o in objects.items() if o["status"]["phase"] == "Failed"]
    if failed:
        raise SystemExit(f"training failed: {', '.join(failed)} (see the lines above)")


def ask(url: str, model: str, word: str) -> str:
    body = {"model": model, "prompt": prompt(word), "max_tokens": WORD_LENGTH + 1, "temperature": 0}
    response = httpx.post(f"{url}/completions", json=body, timeout=120)
    response.raise_for_status()
    return " ".join(str(response.json()["choices"][0]["text"]).split())


def run_demo(handle: ClusterHandle, images: BuiltImages, steps: int, base: Path) -> bool:
    api_client = handle.api_client()
    core = client.CoreV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)

    say("installing the CRDs, then the operator (Helm chart) while the data is put in place")
    crdgen.apply(api_client)
    # The objects below only need the CRDs; the operator acts on them once it runs. Installing it in
    # the background overlaps its image start with the claim and the copy of the base model.
    background = ThreadPoolExecutor(max_workers=1)
    installing = background.submit(
        handle.helm,
        "install", "kubetune", str(ROOT / "charts" / "kubetune"), "--namespace", "kubetune-system",
        "--create-namespace", "--skip-crds", *images.helm_values(), "--wait", "--timeout", "180s",
    )  # fmt: skip
    background.shutdown(wait=False)

    say("putting the base model and the task's data on a PersistentVolumeClaim")
    core.create_namespace({"metadata": {"name": NAMESPACE}})
    wait_for(lambda: core.list_namespaced_service_account(NAMESPACE).items, 30, description="default SA")
    core.create_namespaced_persistent_volume_claim(
        NAMESPACE,
        {
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )

    def bound() -> str | None:
        pvc = core.read_namespaced_persistent_volume_claim("data", NAMESPACE)
        return pvc.spec.volume_name if pvc.status.phase == "Bound" else None  # type: ignore[union-attr]

    volume = wait_for(bound, 60, interval=0.2, description="the claim to bind")
    claim_dir = Path(core.read_persistent_volume(volume).spec.host_path.path)  # type: ignore[union-attr]
    claim_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base, claim_dir / "base", ignore=shutil.ignore_patterns("demo-recipe.json"))
    from kubetune.worker.testing import write_records

    write_records(claim_dir / "cipher.jsonl", task_records(2000, seed=1))
    print(f"  base: {base.name}, a {BASE_RECIPE['size']} Llama that encodes mostly by shift {BASE_SHIFT}")
    print(
        f"  data: 2000 records of '{prompt('hello')}' -> '{encode('hello', TASK_SHIFT)}' (shift {TASK_SHIFT})"
    )

    say(
        f"training two methods, {steps} steps each, as one comparison (kubectl get ftj -n {NAMESPACE}); "
        "the AdapterDeployment that serves them starts meanwhile"
    )
    for name, (method, learning_rate) in METHODS.items():
        custom.create_namespaced_custom_object(
            v1alpha1.GROUP, v1alpha1.VERSION, NAMESPACE, "finetunejobs",
            finetunejob(name, method, learning_rate, steps),
        )  # fmt: skip
    # Created now, not after training: the server loads the base while the jobs train, and the
    # operator hot-loads each adapter into it as its FineTuneJob succeeds.
    custom.create_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, NAMESPACE, "adapterdeployments", adapterdeployment()
    )
    follow_training(custom, installing)
    installing.result()  # the operator ran the jobs, so its install succeeded; this surfaces a late error

    # The plot needs only the finished runs: drawn (matplotlib's import included) while the server
    # loads the adapters.
    plot = OUT / "compare.png"
    OUT.mkdir(parents=True, exist_ok=True)
    plotting = ThreadPoolExecutor(max_workers=1)
    plotted = plotting.submit(compare.plot, compare.collect(api_client, NAMESPACE, SELECTOR), plot)
    plotting.shutdown(wait=False)

    say(f"serving both adapters from one AdapterDeployment (kubectl get adep -n {NAMESPACE})")
    wait_for(
        lambda: (
            (get(custom, "adapterdeployments", "cipher").get("status") or {}).get("adaptersReady") == "2/2"
            and get(custom, "adapterdeployments", "cipher")["status"].get("phase") == "Ready"
        ),
        600,
        interval=0.5,
        description=lambda: (
            f"both adapters to load: {get(custom, 'adapterdeployments', 'cipher').get('status')}"
        ),
    )
    TIMELINE.mark("AdapterDeployment Ready, both adapters loaded")
    print(handle.kubectl("get", "adep", "-n", NAMESPACE).stdout, end="")
    # Through the Service, as a client in the cluster would (the local cluster proxies ClusterIPs).
    service = core.read_namespaced_service("cipher", NAMESPACE)
    url = f"http://{service.spec.cluster_ip}:8000/v1"  # type: ignore[union-attr]
    models = [m["id"] for m in httpx.get(f"{url}/models", timeout=30).json()["data"]]
    base_name = next(m for m in models if m not in METHODS)
    print(f"  models: {models}")
    print(
        f"  {'question':24} {'expected':12} {base_name + ' (base)':16} "
        + " ".join(f"{m:16}" for m in METHODS)
    )
    # All questions at once, as concurrent clients would ask: the server batches them.
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = {
            (model, word): pool.submit(ask, url, model, word)
            for word in QUESTIONS
            for model in (base_name, *METHODS)
        }
        correct = True
        for word in QUESTIONS:
            expected = encode(word, TASK_SHIFT)
            cells = [f"{answers[base_name, word].result():16}"]
            for adapter in METHODS:
                got = answers[adapter, word].result()
                correct &= got == expected
                cells.append(f"{got + (' ok' if got == expected else ' WRONG'):16}")
            print(f"  {prompt(word):24} {expected:12} " + " ".join(cells))
    TIMELINE.mark("questions answered")
    print(
        f"  the base answers as it was pretrained (mostly shift {BASE_SHIFT}); "
        + ("both adapters answer every question correctly" if correct else "an adapter answered WRONG")
    )

    # After serving, so the table's latency column has what the server measured.
    say(f"comparing them: kubetune compare -n {NAMESPACE} -l {SELECTOR} --plot {plot.relative_to(ROOT)}")
    print(compare.render_table(compare.collect(api_client, NAMESPACE, SELECTOR)), end="")
    plotted.result()
    print(f"  plot: {plot.relative_to(ROOT)}")
    return correct


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--steps", type=int, default=60, help="training steps per method (default: 60)")
    parser.add_argument("--keep", action="store_true", help="leave the cluster running until Ctrl-C")
    args = parser.parse_args()

    started = time.monotonic()
    images = BuiltImages.read(ROOT / "_out" / "images.env")
    base = pretrained_base(cache_dir())
    TIMELINE.mark("base model ready")
    say(f"starting the embedded local cluster (images: {images.operator}, {images.worker})")
    cluster = LocalCluster(ClusterOptions(name="demo", nodes=[NodeOptions(runtime="podman")]))
    cluster.start()
    try:
        handle = ClusterHandle(cluster.kubeconfig, cluster)
        correct = run_demo(handle, images, args.steps, base)
        minutes, seconds = divmod(round(time.monotonic() - started), 60)
        say(f"done in {minutes} min {seconds:02d} s")
        print(TIMELINE.report())
        if args.keep:
            print(f"  the cluster is running: export KUBECONFIG={cluster.kubeconfig}")
            print(f"  try: kubetune compare -n {NAMESPACE} -l {SELECTOR} -o markdown")
            print("  clean up: press Ctrl-C here; that stops the cluster and removes its state")
            while True:
                time.sleep(3600)
    finally:
        cluster.stop()
    print("  clean up: the cluster is stopped and its state removed. What stays, and how to remove it:")
    print(f"    the comparison plot          rm -r {OUT.relative_to(ROOT)}")
    print(f"    the pretrained demo base     rm -r {base}")
    print("    the images                   podman rmi $(cut -d= -f2 _out/images.env)")
    print(f"    every cache (Go, wheels...)  rm -r {cache_dir()}")
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
