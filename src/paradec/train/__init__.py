"""Training drafters from the target itself: Medusa heads, the EAGLE-style head, and draft-model distillation.

`paradec train medusa|eagle|draft` (see `paradec.train.cli`) runs `paradec.train.pipeline.run`: self-distilled
data (`data`; for a chat target by default self-chat, `selfchat`: requests the target writes itself, kept clear of
the bench dev suites by `overlap`), a shared optimisation loop (`loop`), one loss per kind (`medusa`, `eagle`,
`draft`), then the saved output with its card.
"""
