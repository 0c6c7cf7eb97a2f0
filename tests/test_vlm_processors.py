"""The VLM families added beside LLaVA, fed by their own processors (built offline from a word-level
tokenizer holding each family's special tokens): prompts laid out as real checkpoints see them
(InternVL's <img> tiles, Pixtral's [IMG_BREAK] rows, Gemma 3's image blocks, Aya's tiles and
markers, PaliGemma's image-first prefix), images of several sizes and counts in one batch.
A reduced batch gives each row what it gets alone, forward and generate()."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import tokenreduce as tr  # noqa: E402

tf = pytest.importorskip("transformers")
# PaliGemma's processor trips a numpy 2 deprecation inside transformers
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "describe", "the", "image", "what", "is", "this", "a", "cat", "dog",
         "red", "and", "Here", "original", "here", "are", "some", "crops", "to", "help", "you", "see", "better",
         "_", "1", "2", "3", ":"]


def _tokenizer(special, roles):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece(prefix="##")
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                      eos_token="</s>", padding_side="left", extra_special_tokens=roles)


def _text(tok, config_class, **kw):
    return config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                        pad_token_id=tok.pad_token_id, **kw).to_dict()


def _siglip():
    return tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=28, patch_size=7).to_dict()


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def internvl():
    tok = _tokenizer(["<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
                     {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                      "video_token": "<video>"})
    proc = tf.InternVLProcessor(image_processor=tf.GotOcr2ImageProcessor(
        size={"height": 28, "width": 28}, crop_to_patches=True, min_patches=1, max_patches=4), tokenizer=tok,
        video_processor=tf.InternVLVideoProcessor(size={"height": 28, "width": 28}), image_seq_length=4)
    vision = tf.InternVLVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     image_size=28, patch_size=7)
    cfg = tf.InternVLConfig(vision_config=vision.to_dict(), text_config=_text(tok, tf.Qwen2Config),
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4)
    # one tile; a wide image (3 tiles + thumbnail); two images in one prompt
    return proc, tf.InternVLForConditionalGeneration(cfg), "<IMG_CONTEXT>", [(28, 28), (28, 84), (56, 56)]


def gemma3():
    tok = _tokenizer(["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
                     {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                      "image_token": "<image_soft_token>"})
    proc = tf.Gemma3Processor(image_processor=tf.Gemma3ImageProcessor(size={"height": 28, "width": 28}), tokenizer=tok,
                              image_seq_length=4)
    text = _text(tok, tf.Gemma3TextConfig, head_dim=8, sliding_window=64, query_pre_attn_scalar=8)
    cfg = tf.Gemma3Config(text_config=text, vision_config=_siglip(), mm_tokens_per_image=4,
                          image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
                          boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                          eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"))
    return proc, tf.Gemma3ForConditionalGeneration(cfg), "<start_of_image>", [(28, 28), (28, 56), (56, 28)]


def mistral3():
    tok = _tokenizer(["[IMG]", "[IMG_BREAK]", "[IMG_END]"], {"image_token": "[IMG]"})
    proc = tf.PixtralProcessor(image_processor=tf.PixtralImageProcessor(
        size={"longest_edge": 84}, patch_size={"height": 14, "width": 14}), tokenizer=tok, patch_size=14,
        spatial_merge_size=2)
    vision = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=84, patch_size=14, head_dim=8)
    cfg = tf.Mistral3Config(vision_config=vision.to_dict(),
                            text_config=_text(tok, tf.MistralConfig, sliding_window=None),
                            image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2)
    # rows of [IMG] ended by [IMG_BREAK] / [IMG_END], images of other aspect ratios
    return proc, tf.Mistral3ForConditionalGeneration(cfg), "[IMG]", [(56, 56), (28, 84), (84, 56)]


def aya_vision():
    tok = _tokenizer(["<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>",
                      "TILE_GLOBAL", "TILE"], {"image_token": "<image>"})
    proc = tf.AyaVisionProcessor(image_processor=tf.GotOcr2ImageProcessor(
        size={"height": 28, "width": 28}, crop_to_patches=True, min_patches=1, max_patches=4), tokenizer=tok,
        patch_size=7, img_size=28, downsample_factor=2)
    cfg = tf.AyaVisionConfig(vision_config=_siglip(), text_config=_text(tok, tf.Cohere2Config, sliding_window=256),
                             image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"), downsample_factor=2,
                             adapter_layer_norm_eps=1e-5)
    return proc, tf.AyaVisionForConditionalGeneration(cfg), "<image>", [(28, 28), (28, 84), (56, 56)]


def paligemma():
    tok = _tokenizer(["<image>"], {"image_token": "<image>"})
    images = tf.SiglipImageProcessor(size={"height": 28, "width": 28})
    images.image_seq_length = 16
    proc = tf.PaliGemmaProcessor(image_processor=images, tokenizer=tok)
    cfg = tf.PaliGemmaConfig(vision_config=_siglip(), text_config=_text(proc.tokenizer, tf.GemmaConfig, head_dim=8),
                             image_token_index=proc.tokenizer.convert_tokens_to_ids("<image>"), projection_dim=32)
    return proc, tf.PaliGemmaForConditionalGeneration(cfg), "<image>", [(28, 28), (28, 28), (28, 28)]


FAMILIES = {f.__name__: f for f in (internvl, gemma3, mistral3, aya_vision, paligemma)}


def _inputs(name, proc, token, sizes):
    """three prompts: one image, one image mid-text, and (but PaliGemma: one image per prompt) two"""
    images = [_image(h, w, i) for i, (h, w) in enumerate(sizes)]
    if name == "paligemma":  # the image first, then the prefix
        texts, per_row = ["describe the image", "what is this red", "a dog"], [[im] for im in images]
    else:
        texts = [f"{token} describe the image", f"what is this {token} red", f"{token} a cat and {token} a dog"]
        per_row = [[images[0]], [images[1]], [images[2], images[0]]]

    def run(t, i):
        out = dict(proc(text=t, images=i, return_tensors="pt", padding=True))
        out.pop("labels", None)
        return out
    return run(texts, per_row), [run([t], [i]) for t, i in zip(texts, per_row)]


def _generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)


@pytest.mark.parametrize("spec", ["projector.out=uniform(keep=0.5)", "llm.layer.1=fastv(ratio=0.5)"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_processor_batches_reduce_as_each_row_alone(name, spec):
    torch.manual_seed(0)
    proc, model, token, sizes = FAMILIES[name]()
    model.eval()
    batch, singles = _inputs(name, proc, token, sizes)
    with torch.no_grad():
        unreduced = model(**batch).logits
        with tr.reduce(model, spec) as h:
            together = model(**batch).logits
            site = spec.split("=")[0]
            assert h.stats["sites"][site]["tokens_out"] < h.stats["sites"][site]["tokens_in"]
            g = _generate(model, batch)
            for b, single in enumerate(singles):
                alone = model(**single).logits[0]
                real = batch["attention_mask"][b].bool()
                assert torch.allclose(together[b][real], alone, atol=1e-4), (b, (together[b][real] - alone).abs().max())
                one = _generate(model, single)
                for t in range(3):
                    assert torch.allclose(g.scores[t][b], one.scores[t][0], atol=1e-4), (b, t)
                    if g.sequences[b, -3 + t] != one.sequences[0, -3 + t]:
                        break
        assert torch.equal(model(**batch).logits, unreduced)  # removed: as before
