// Load an edgemed ONNX artifact with transformers.js (Node, onnxruntime-node) exactly as a web or
// Electron clinic app would, and dump what it computes for tests/test_frontends.py to compare
// with edgemed's own runtime and the PyTorch parent.
//
//   node transformersjs_check.mjs ARTIFACT_DIR REQUEST.json OUT_DIR
//
// REQUEST.json (a VLM): {"prompt": "<rendered prompt text with one image placeholder>",
//                "messages": [...chat messages for apply_chat_template...],
//                "rgb": "image.rgb", "width": W, "height": H, "max_new_tokens": N}
// or (a text LLM): {"kind": "text", "messages": [...], "max_new_tokens": N}.
// Writes OUT_DIR/result.json (input ids, templated text, generated ids, dims) and the float32
// tensors OUT_DIR/logits.f32 and OUT_DIR/pixel_values.f32.
import fs from "node:fs";
import path from "node:path";

import {
  AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, RawImage, env,
} from "@huggingface/transformers";

const [artifact, requestPath, outDir] = process.argv.slice(2);
const request = JSON.parse(fs.readFileSync(requestPath, "utf8"));

env.allowRemoteModels = false; // nothing leaves the machine
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(artifact)) + path.sep;
const name = path.basename(path.resolve(artifact));
fs.mkdirSync(outDir, { recursive: true });

if (request.kind === "text") {
  // A text LLM: onnx/model.onnx (input_ids in), the tokenizer's own chat template.
  const tokenizer = await AutoTokenizer.from_pretrained(name);
  const model = await AutoModelForCausalLM.from_pretrained(name, { dtype: "fp32", device: "cpu" });
  const templated = tokenizer.apply_chat_template(request.messages, { tokenize: false, add_generation_prompt: true });
  const inputs = tokenizer.apply_chat_template(request.messages, { add_generation_prompt: true, return_dict: true });
  const forward = await model(inputs);
  const generated = await model.generate({ ...inputs, max_new_tokens: request.max_new_tokens, do_sample: false });
  fs.writeFileSync(path.join(outDir, "logits.f32"), Buffer.from(forward.logits.data.buffer));
  fs.writeFileSync(path.join(outDir, "result.json"), JSON.stringify({
    input_ids: Array.from(inputs.input_ids.data, Number),
    generated_ids: Array.from(generated.data, Number),
    logits_dims: forward.logits.dims,
    templated,
  }));
  console.log("ok");
  process.exit(0);
}

const processor = await AutoProcessor.from_pretrained(name);
const model = await AutoModelForImageTextToText.from_pretrained(name, { dtype: "fp32", device: "cpu" });

const rgb = fs.readFileSync(path.resolve(path.dirname(requestPath), request.rgb));
const image = new RawImage(new Uint8ClampedArray(rgb), request.width, request.height, 3);
// LlavaProcessor takes (images, text); Idefics3Processor / SmolVLMProcessor take (text, images).
const inputs = processor.constructor.name === "LlavaProcessor"
  ? await processor(image, request.prompt)
  : await processor(request.prompt, image);

const forward = await model(inputs); // logits at every position of the prompt
const generated = await model.generate({ ...inputs, max_new_tokens: request.max_new_tokens, do_sample: false });

let templated = null;
if (request.messages) {
  templated = processor.tokenizer.apply_chat_template(request.messages, { tokenize: false, add_generation_prompt: true });
}
fs.writeFileSync(path.join(outDir, "logits.f32"), Buffer.from(forward.logits.data.buffer));
fs.writeFileSync(path.join(outDir, "pixel_values.f32"), Buffer.from(inputs.pixel_values.data.buffer));
fs.writeFileSync(path.join(outDir, "result.json"), JSON.stringify({
  input_ids: Array.from(inputs.input_ids.data, Number),
  generated_ids: Array.from(generated.data, Number),
  logits_dims: forward.logits.dims,
  pixel_values_dims: inputs.pixel_values.dims,
  templated,
}));
console.log("ok");
