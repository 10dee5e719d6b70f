// Runs llama.cpp (node-llama-cpp's prebuilt CPU build) on one GGUF file for sft-pipeline.
//
// stdin (JSON):  {"model": path, "texts": [str], "sequences": [[token id]], "threads": n}
// stdout (JSON): {"tokens": [[id]]   each text tokenized with special tokens parsed, no BOS added,
//                 "next": [[id]]     for each sequence, llama.cpp's greedy (argmax) next token
//                                    after every position (teacher-forced),
//                 "vocab": n, "system": str}
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const request = JSON.parse(Buffer.concat(chunks).toString("utf8"));

const llama = await getLlama({ gpu: false, build: "never", logLevel: process.env.SFT_LLAMACPP_LOG === "1" ? LlamaLogLevel.debug : LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath: request.model, useMmap: false });
const tokens = (request.texts ?? []).map((text) => Array.from(model.tokenize(text, true)));

const next = [];
const sequences = request.sequences ?? [];
if (sequences.length > 0) {
  const longest = Math.max(...sequences.map((s) => s.length));
  const context = await model.createContext({
    contextSize: Math.max(64, longest + 8),
    batchSize: Math.max(64, longest + 8),
    threads: request.threads ?? 2,
  });
  const sequence = context.getSequence();
  for (const ids of sequences) {
    await sequence.clearHistory();
    const input = ids.map((id) => [id, { generateNext: { token: true, options: { temperature: 0 } } }]);
    const output = await sequence.controlledEvaluate(input);
    next.push(ids.map((_, i) => output[i]?.next?.token ?? null));
  }
  await context.dispose();
}
process.stdout.write(
  JSON.stringify({ tokens, next, vocab: model.tokens.vocabularyType ? model.fileInsights.tensorInfo?.length ?? null : null, system: llama.systemInfo }),
);
await model.dispose();
await llama.dispose();
