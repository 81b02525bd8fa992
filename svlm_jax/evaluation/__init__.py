"""`svlm eval`: a model streamed over a video and measured (docs/eval.md).

  metrics  per-second numbers without a judge: latency, real-time factor, silence, words per
           second, word agreement with a reference
  judge    the Inf-Streams-Eval comparison: windows of commentary judged in both orders by an
           OpenAI-compatible chat endpoint, answers cached; the win rate with its Wilson interval
  qa       real-time multiple-choice questions at given seconds of the stream (OVO-Bench style)
  run      the command: one stream, the reference, the report (JSON and markdown)

This package's __init__ imports nothing, so that `svlm --help` stays fast.
"""
