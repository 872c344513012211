rule evaluate:
    input:
        samples=f"{ROOT}/samples/{{run}}/{{step}}/{{sampler}}.npz",
        reference=f"{ROOT}/reference/stats-{PIPE['extractor']}.pt",
    output:
        f"{ROOT}/metrics/{{run}}/{{step}}/{{sampler}}.json",
    params:
        **stage_params("evaluate", run=lambda wc: wc.run, step=lambda wc: int(wc.step), sampler=lambda wc: wc.sampler),
    threads: 1
    script:
        "../scripts/stage.py"
