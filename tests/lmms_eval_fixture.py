"""Build a tiny multimodal checkpoint and a tiny offline lmms-eval task, for the lmms_eval backend's real runs.

Run with lmms-eval's own interpreter (it needs torch, transformers and Pillow; not ckpt-watch):

    LMMS_PYTHON tests/lmms_eval_fixture.py OUT_DIR

writes OUT_DIR/model (a randomly initialised LLaVA: a 1-layer CLIP vision tower, a 2-layer Llama, a byte-level
tokenizer with an <image> token, a processor with a chat template; loadable by lmms-eval's generic `huggingface`
model with pretrained=OUT_DIR/model) and the task `ckpt_watch_tiny_vqa` (four 32x32 PNGs of solid colours,
"What colour is this image?", exact match; its data are local JSON lines, so no Hub access). Prints the paths as
JSON. Nothing is downloaded.

Local mode passes the task directory as include_path. The lmms-eval server has no include_path, and in 0.7.3
neither of its ways in works for a task outside lmms_eval/tasks/: a task given as the path of its YAML fails with
"Tasks not found" (cli_evaluate_single counts the loaded config, not the path, as found), and LMMS_EVAL_PLUGINS
is added to include_path only after the TaskManager was built. So OUT_DIR/server_site holds a sitecustomize.py
that adds $CKPT_WATCH_LMMS_EXTRA_TASKS to every TaskManager's include path: start the test server, and so its
evaluation subprocesses, with PYTHONPATH=OUT_DIR/server_site and CKPT_WATCH_LMMS_EXTRA_TASKS=<the task dir>.
(A real deployment installs its tasks into the server's lmms_eval/tasks/ instead.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TASK_YAML = """\
task: ckpt_watch_tiny_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 0.0
"""
SITECUSTOMIZE = """\
import os

if os.environ.get("CKPT_WATCH_LMMS_EXTRA_TASKS"):
    import lmms_eval.tasks as _tasks

    _initialize = _tasks.TaskManager.initialize_tasks

    def _initialize_with_extra(self, include_path=None, include_defaults=True):
        paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
        paths.append(os.environ["CKPT_WATCH_LMMS_EXTRA_TASKS"])
        return _initialize(self, include_path=paths, include_defaults=include_defaults)

    _tasks.TaskManager.initialize_tasks = _initialize_with_extra
"""
TASK_UTILS = """\
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]
"""


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<s>", "</s>", "<pad>", "<image>"):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"}, model_max_length=512)


def build_model_dir(out: Path) -> Path:
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    path = out / "model"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_task_dir(out: Path) -> Path:
    from PIL import Image

    tasks = out / "tasks"
    images = tasks / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(images / f"{name}.png")
        rows.append({"image": str(images / f"{name}.png"), "question": "What colour is this image?", "answer": name})
    data = tasks / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    # JSON strings are valid double-quoted YAML scalars, so odd characters in the paths are safe.
    yaml = TASK_YAML.format(data=json.dumps(str(data)), cache=json.dumps(str(out / "datasets_cache")))
    (tasks / "ckpt_watch_tiny_vqa.yaml").write_text(yaml, encoding="utf-8")
    (tasks / "utils.py").write_text(TASK_UTILS, encoding="utf-8")
    site = out / "server_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    return tasks


if __name__ == "__main__":
    target = Path(sys.argv[1]).resolve()
    target.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"model": str(build_model_dir(target)), "tasks": str(build_task_dir(target)),
                      "server_site": str(target / "server_site")}))
