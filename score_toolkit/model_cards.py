"""Model cards of exported folders, by the Hub's conventions: :func:`render_model_card` writes the card of an
export (YAML metadata through ``huggingface_hub``'s ``ModelCard``/``EvalResult``, from the Jinja2 templates
shipped in the package), :func:`update_model_card` puts new results into an existing card, and
:func:`check_result` keeps the ``model-index`` to measurements of the model (floors and settings go to the
card's text or the result's name)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .processes import Process

#: model card templates (Jinja2, as huggingface_hub's ModelCard.from_template reads them), shipped in the package
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
DEFAULT_TEMPLATE = "score_model.md"


def _component_origin(obj) -> tuple[str, str]:
    module = type(obj).__module__
    return ("diffusers" if module.startswith("diffusers") else module), type(obj).__name__


#: metric types of the model's own measurements that score_toolkit writes into a card's ``model-index``
#: (what each measures). Noise floors, training losses, NFE and settings are not measurements of the model:
#: they go in the card's text or in a result's name and ``metric_args`` (see :func:`check_result`).
MODEL_MEASUREMENTS = {
    "sliced_wasserstein": "sliced Wasserstein-2 distance between samples and real data (smaller is better)",
    "energy_distance": "energy distance between samples and real data (smaller is better)",
    "mmd": "maximum mean discrepancy between samples and real data (smaller is better)",
    "mode_weight_error": "total variation between the mixture weights and the samples' mode shares",
    "within_mode_sliced_wasserstein": "sliced W2 within the modes of a known mixture",
    "modes_covered": "modes of a known mixture that the samples cover (larger is better)",
    "coverage": "coverage of the real data by the samples (Naeem et al. 2020; near 1 is best)",
    "density": "density of the samples around the real data (Naeem et al. 2020; near 1 is best)",
    "frechet_distance": "Frechet distance between samples and real data in a classifier's features",
    "mean_confidence": "mean top-class probability a classifier gives the samples",
    "class_histogram_tv": "total variation between the samples' class shares and the data's",
    "bits_per_dim": "negative log-likelihood of real data in bits per dimension (smaller is better)",
    "accuracy": "share of held-out images a classifier labels right",
    "requested_class_accuracy": "share of class-conditional samples a classifier labels as the requested class",
}
_NOT_MEASUREMENTS = {"training_loss", "loss", "nfe", "num_steps", "wall_time", "wall_time_s"}
#: the text between these lines is generated from the model-index (:func:`update_model_card` rewrites it)
RESULTS_BEGIN = "<!-- score-toolkit results: generated from the model-index; edit the metadata, not this table -->"
RESULTS_END = "<!-- end of score-toolkit results -->"


def check_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one measurement for a card: a mapping with ``type`` (a metric id), ``name`` (what was measured,
    against what), ``value`` (a finite number) and optionally ``floor`` (the same metric between two disjoint
    sets of real data: written into the name, never as a score of the model), ``settings`` (how it was measured:
    sampler, options, number of samples, seed; goes to the result's ``metric_args``) and ``command`` (the command
    that measured it; shown under the card's results table). Noise floors, training losses and NFE are refused
    as results: they are not measurements of the model."""
    if not isinstance(result, Mapping):
        raise TypeError(f"expected a result as a mapping with type, name and value, found {type(result).__name__}")
    unknown = sorted(set(result) - {"type", "name", "value", "floor", "settings", "command", "dataset"})
    if unknown:
        raise ValueError(f"result {result.get('name')!r}: unknown key(s) {unknown}; expected type, name, value and "
                         f"optionally floor, settings, command")
    kind, name, value = result.get("type"), result.get("name"), result.get("value")
    if not isinstance(kind, str) or not kind or not isinstance(name, str) or not name:
        raise ValueError(f"expected a result with a non-empty str type and name, found type {kind!r}, name {name!r}")
    if kind in _NOT_MEASUREMENTS or kind.endswith("_floor") or name.lower().startswith(("noise floor", "floor")):
        raise ValueError(f"result {name!r} (type {kind!r}) is not a measurement of the model: a card's model-index "
                         f"holds the model's measurements only; give a noise floor as the measurement's 'floor', "
                         f"and training losses, NFE and settings in the card's text ('notes') or 'settings'")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"result {name!r}: expected a finite number as value, found {value!r}")
    out = {"type": kind, "name": name, "value": value}
    floor = result.get("floor")
    if floor is not None:
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not math.isfinite(floor):
            raise ValueError(f"result {name!r}: expected a finite number as floor, found {floor!r}")
        out["floor"] = floor
    settings = result.get("settings")
    if settings is not None and not isinstance(settings, Mapping):
        raise ValueError(f"result {name!r}: expected settings as a mapping, found {type(settings).__name__}")
    out["settings"] = copy.deepcopy(dict(settings or {}))  # no shared objects: YAML would write anchors
    if result.get("command") is not None:
        out["command"] = str(result["command"])
    return out


def _eval_result(result: Mapping[str, Any], task: str, dataset_type: str, dataset_name: str):
    """A checked result as a huggingface_hub ``EvalResult``: the floor in the name, settings and command in
    ``metric_args``."""
    from huggingface_hub import EvalResult

    r = check_result(result)
    name = r["name"] if "floor" not in r else f"{r['name']} (noise floor {r['floor']:.4g})"
    args = dict(r["settings"])
    if "command" in r:
        args["command"] = r["command"]
    return EvalResult(task_type=task, dataset_type=dataset_type, dataset_name=dataset_name, metric_type=r["type"],
                      metric_value=r["value"], metric_name=name, metric_args=args or None)


def _fmt_value(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _fmt_setting(v) -> str:
    if isinstance(v, Mapping):
        return "(" + ", ".join(f"{k}={_fmt_setting(x)}" for k, x in v.items()) + ")" if v else "()"
    return _fmt_value(v)


def results_markdown(eval_results) -> str:
    """The results section of a card's text, from its ``EvalResult`` list: one table row per measurement (name
    with its noise floor, value, settings; the data when not all rows share it), then the commands that measured
    them, all between :data:`RESULTS_BEGIN` and :data:`RESULTS_END`."""
    lines = [RESULTS_BEGIN, ""]
    if not eval_results:
        lines += ["No measurements were recorded.", "", RESULTS_END]
        return "\n".join(lines)
    commands: list[str] = []
    datasets = {r.dataset_name for r in eval_results}
    one_data = len(datasets) == 1
    head = ["measurement", "value"] + ([] if one_data else ["data"]) + ["settings", "measured by"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in eval_results:
        args = dict(r.metric_args or {})
        command = args.pop("command", None)
        ref = "-"
        if command:
            if command not in commands:
                commands.append(command)
            ref = f"[{commands.index(command) + 1}]"
        settings = ", ".join(f"{k}={_fmt_setting(v)}" for k, v in args.items()) or "-"
        row = [r.metric_name or r.metric_type, _fmt_value(r.metric_value)] + ([] if one_data else [r.dataset_name])
        lines.append("| " + " | ".join(row + [settings, ref]) + " |")
    if one_data:
        lines += ["", f"Data: {next(iter(datasets))}."]
    if commands:
        lines += ["", "Measured by:", ""]
        lines += [f"{i}. `{c}`" for i, c in enumerate(commands, 1)]
    lines += ["", RESULTS_END]
    return "\n".join(lines)


def _data_note(dataset_name: str, dataset_id: str | None, description: str) -> str:
    if dataset_id:
        return (f"Training data: {description}, the Hub dataset [`{dataset_id}`](https://huggingface.co/datasets/"
                f"{dataset_id}) (listed in `datasets:`).")
    return (f"Training data: {description}. It has no dataset id on the Hugging Face Hub, so the metadata lists no "
            f"`datasets:`; the results name it by its score_toolkit data set name, `{dataset_name}` "
            f"(`score_toolkit.data.load_dataset(\"{dataset_name}\")`).")


def render_model_card(model, process: Process, prediction_type: str, time_input: str, scheduler,
                      info: Mapping[str, Any], *, has_sample_image: bool = False, template=None):
    """The :class:`huggingface_hub.ModelCard` of an exported folder (offline: no validation against the Hub),
    rendered from the package's template (``score_toolkit/templates/score_model.md``) or ``template``.

    Metadata, by the Hub's conventions: ``library_name: diffusers`` (the folder is a diffusers pipeline folder;
    the text says whether plain diffusers can sample it or ``import score_toolkit`` is needed),
    ``pipeline_tag: unconditional-image-generation`` for image networks (none for vectors: the Hub has no task
    for them), ``datasets`` only for a real Hub dataset id (``info['dataset_id']``), ``model-index`` from
    ``info['results']`` (measurements of the model only, see :func:`check_result`)."""
    from huggingface_hub import ModelCard, ModelCardData

    unet_lib, unet_cls = _component_origin(model)
    sched_lib, sched_cls = _component_origin(scheduler)
    plain_diffusers = unet_lib == "diffusers" and sched_lib == "diffusers"
    ddpm_runs = ddpm_pipeline_runs(model, scheduler)
    is_image = unet_cls == "UNet2DModel" or (len(info.get("sample_shape") or []) == 3)
    model_name = info.get("model_name") or f"score-toolkit-{unet_cls.lower()}"
    dataset_name = info.get("dataset_name") or "unknown"
    dataset_id = info.get("dataset_id") or None
    description = info.get("dataset_description") or dataset_name
    task = "unconditional-image-generation" if is_image else "unconditional-generation"
    eval_results = [_eval_result(r, task, dataset_id or dataset_name, description) for r in info.get("results") or []]
    tags = ["score-toolkit", "score-based-generative-modeling", "diffusion", f"process:{type(process).__name__}",
            f"prediction:{prediction_type}"]
    tags += list(info.get("tags") or [])
    card_data = ModelCardData(
        library_name="diffusers",
        license=info.get("license") or "apache-2.0",
        tags=tags,
        pipeline_tag="unconditional-image-generation" if is_image else None,
        datasets=[dataset_id] if dataset_id else None,
        model_name=model_name,
        eval_results=eval_results or None,
        score_toolkit={"data": dataset_name, "process": _process_summary(process), "prediction_type": prediction_type,
                       "time_input": time_input, "objective": info.get("objective")},
    )
    num_params = sum(p.numel() for p in model.parameters())
    summary_lines = [
        f"A score-based generative model trained with score_toolkit on {description}.",
        "",
        f"- **Network**: `{unet_cls}` ({num_params:,} parameters), stored as `unet/` (safetensors)",
        f"- **Forward process**: `{process!r}`",
        f"- **Prediction type**: `{prediction_type}`; **time input** to the network: `{time_input}`",
        f"- **Scheduler component**: `{sched_cls}` (`scheduler/scheduler_config.json` encodes the process, "
        f"the prediction type and the time input)",
        f"- **Objective**: `{info.get('objective') or 'unknown'}`",
    ]
    if has_sample_image:
        sampler = f" (drawn with `{info['sampler']}`)" if info.get("sampler") else ""
        summary_lines += ["", f"Samples of the model{sampler}:", "", "![samples](sample.png)"]
    if info.get("notes"):
        summary_lines += ["", str(info["notes"])]
    training = []
    if info.get("command"):
        command = str(info["command"]).strip()
        lead = ("Trained with exactly these commands, in order (a resumed run lists each invocation):"
                if "\n" in command else "Trained with exactly this command:")
        training += [lead, "", "```bash", command, "```", ""]
    if info.get("steps") is not None:
        training.append(f"{info['steps']} optimizer steps on {info.get('num_processes', 1)} process(es).")
        training.append("")
    if info.get("final_loss") is not None:
        training.append(f"Final training loss (mean over the last log window): {_fmt_value(info['final_loss'])}.")
        training.append("")
    if info.get("training_config_yaml"):
        training += ["Resolved training configuration:", "", "```yaml", str(info["training_config_yaml"]).rstrip(), "```"]
    kwargs = {
        "model_name": model_name,
        "summary": "\n".join(summary_lines),
        "load_snippet": _load_snippet(plain_diffusers, unet_cls, sched_cls, prediction_type, is_image,
                                      label_classes(model)),
        "results_section": results_markdown(eval_results),
        "data_note": _data_note(dataset_name, dataset_id, description),
        "training_section": "\n".join(training) or "No training information was recorded.",
        "plain_diffusers": plain_diffusers,
        "ddpm_runs": ddpm_runs,
        "num_classes": label_classes(model),
    }
    path = Path(template) if template is not None else TEMPLATES_DIR / DEFAULT_TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(f"expected a model card template at {path}, found nothing there")
    return ModelCard.from_template(card_data, template_path=str(path), **kwargs)


def _result_key(r) -> tuple:
    """What makes two model-index entries the same measurement: metric, data, task, and for a class-conditional
    measurement the requested class and the guidance scale (``class_label``, ``guidance_scale`` in its settings)."""
    args = r.metric_args or {}
    return r.metric_type, r.dataset_type, r.task_type, repr(args.get("class_label")), repr(args.get("guidance_scale"))


def update_model_card(folder, results, *, dataset_type: str | None = None, dataset_name: str | None = None) -> Path:
    """Write measurements into the model card (``README.md``) of ``folder`` through huggingface_hub's
    ``ModelCard``: each result (see :func:`check_result`) replaces the model-index entry of the same metric type
    on the same data (and for the same ``class_label`` and ``guidance_scale`` settings, if any), or is added; the text's results section (between :data:`RESULTS_BEGIN` and
    :data:`RESULTS_END`, appended under a "Results" heading when the card has none) is re-rendered from the
    model-index. Task and data default to those of the card's first result (else its ``score_toolkit.data``).
    The card is rewritten atomically; nothing else in the folder is touched. Returns the card's path."""
    from huggingface_hub import ModelCard

    from ._io import write_text_atomic

    path = Path(folder) / "README.md" if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise FileNotFoundError(f"expected a model card at {path}, found nothing there")
    results = list(results)
    if not results:
        raise ValueError("expected at least one result to write into the card, found none")
    card = ModelCard.load(path)
    current = list(card.data.eval_results or [])
    if current:
        task = current[0].task_type
        dataset_type = dataset_type or current[0].dataset_type
        dataset_name = dataset_name or current[0].dataset_name
    else:
        task = card.data.pipeline_tag or "unconditional-generation"
        extra = card.data.to_dict().get("score_toolkit") or {}
        dataset_type = dataset_type or extra.get("data")
        dataset_name = dataset_name or dataset_type
    if not dataset_type:
        raise ValueError(f"{path}: the card names no data set; pass dataset_type= (a Hub dataset id, or the data "
                         f"set's name when it has none)")
    if card.data.model_name is None:
        card.data.model_name = path.parent.name
    for result in results:
        new = _eval_result(result, task, dataset_type, dataset_name)
        same = [i for i, old in enumerate(current) if _result_key(old) == _result_key(new)]
        if same:
            current[same[0]] = new
        else:
            current.append(new)
    card.data.eval_results = current
    block = results_markdown(current)
    text = card.text
    if RESULTS_BEGIN in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_BEGIN, 1)
        text = head + block + rest.split(RESULTS_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Results\n\n" + block + "\n"
    card.text = text
    write_text_atomic(path, str(card))
    return path


def ddpm_pipeline_runs(model, scheduler) -> bool:
    """Whether diffusers' ``DDPMPipeline`` (the class an exported ``model_index.json`` names) can *run* these
    components, not only load them: an image network (``sample_size``, ``in_channels``) without a label table
    (DDPMPipeline passes no class labels), a scheduler with ``step()``, and a unit-variance prior (DDPMPipeline draws
    N(0, I) noise)."""
    cfg = model.config
    return (cfg.get("sample_size") is not None and cfg.get("in_channels") is not None
            and label_classes(model) is None and callable(getattr(scheduler, "step", None))
            and float(getattr(scheduler, "init_noise_sigma", 1.0)) == 1.0)


def label_classes(model) -> int | None:
    """The number of classes of a label-conditional network (its label table has one more row, the null label of
    classifier-free guidance: ``num_class_embeds`` of ``UNet2DModel``, ``num_classes`` of ``ScoreMLP``), else None."""
    cfg = getattr(model, "config", None) or {}
    rows = cfg.get("num_class_embeds") or cfg.get("num_classes")
    return int(rows) - 1 if rows else None


#: what an exported model_index.json says when DDPMPipeline can load but not run the folder
SAMPLING_NOTE = ("DDPMPipeline loads these components but cannot sample them (its loop needs an image network and "
                 "a scheduler with step()); sample with score_toolkit: import score_toolkit; "
                 "ScorePipeline.from_pretrained(folder)(batch_size=16) (see README.md)")
#: the same for a label-conditional network
SAMPLING_NOTE_LABELS = ("DDPMPipeline loads these components but cannot sample them (the network takes class labels, "
                        "which DDPMPipeline does not pass); sample with score_toolkit: import score_toolkit; "
                        "ScorePipeline.from_pretrained(folder)(batch_size=16, class_labels=3, guidance_scale=2.0) "
                        "(see README.md)")


def _process_summary(process: Process) -> dict[str, Any]:
    cfg = {k: v for k, v in process.config.items() if not k.startswith("_") and k != "alphas_cumprod"}
    return {"class": type(process).__name__, **cfg}


def _load_snippet(plain_diffusers: bool, unet_cls: str, sched_cls: str, prediction_type: str, is_image: bool,
                  num_classes: int | None = None) -> str:
    if num_classes is not None:  # a label-conditional network: a class is drawn with classifier-free guidance
        last = num_classes - 1
        return "\n".join([
            "import torch",
            "from score_toolkit.pipeline import ScorePipeline",
            "",
            "folder = \"path/to/this/folder\"  # or a local snapshot of the Hub repository",
            "pipe = ScorePipeline.from_pretrained(folder)  # safetensors only, strict, never runs code from the folder",
            f"# classes 0..{last}; label {num_classes} is the null label (label dropout): classifier-free guidance",
            f"out = pipe(16, class_labels={min(3, last)}, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))",
            "images = out.images  # PIL images; out.samples: the tensor",
            "# without class_labels the null label gives the unconditional model",
            "# command line: score-toolkit sample --model path/to/this/folder --class-label 3 --guidance-scale 2",
        ])
    lines = [
        "import torch",
        "import score_toolkit  # makes score_toolkit's components loadable by diffusers",
        "from diffusers import DiffusionPipeline",
        "from score_toolkit.hub import load_pipeline_components",
        "from score_toolkit.registry import get_sampler",
        "from score_toolkit.scores import ScoreAdapter",
        "",
        "folder = \"path/to/this/folder\"  # or a local snapshot of the Hub repository",
        "pipe = DiffusionPipeline.from_pretrained(folder)  # diffusers view: pipe.unet, pipe.scheduler",
        "",
        "# score_toolkit view: safetensors only, strict, never runs code from the folder",
        "model, process, prediction_type, time_input = load_pipeline_components(folder)",
        "score_fn = ScoreAdapter(model, process, prediction_type, time_input)",
        "sampler = get_sampler(\"ancestral\", num_steps=500, denoise=True)",
        "shape = " + ("(16, model.config.in_channels, model.config.sample_size, model.config.sample_size)"
                      if is_image else "(1000, model.config.dim)"),
        "samples = sampler.sample(score_fn, process, shape=shape, generator=torch.Generator().manual_seed(0)).samples",
    ]
    if plain_diffusers and sched_cls == "DDPMScheduler":
        lines += [
            "",
            "# plain diffusers (no score_toolkit needed for this one):",
            "from diffusers import DDPMPipeline",
            "images = DDPMPipeline.from_pretrained(folder)(batch_size=16, num_inference_steps=1000, output_type=\"np\").images",
        ]
    return "\n".join(lines)
