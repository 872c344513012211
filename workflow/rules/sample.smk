def checkpoint_of(wc):
    if wc.run.startswith("scm-"):
        return f"{ROOT}/distill/{wc.run[len('scm-'):]}/ckpt-{wc.step}.pt"
    return f"{ROOT}/train/{wc.run}/ckpt-{wc.step}.pt"


rule sample:
    input:
        checkpoint_of,
        ([f"{ROOT}/autoencoder/model.safetensors"] if AE_TINY else []),
    output:
        npz=f"{ROOT}/samples/{{run}}/{{step}}/{{sampler}}.npz",
        info=f"{ROOT}/samples/{{run}}/{{step}}/{{sampler}}.json",
        grid=f"{ROOT}/samples/{{run}}/{{step}}/{{sampler}}.png",
    params:
        **stage_params("sample", run=lambda wc: wc.run, step=lambda wc: int(wc.step), sampler=lambda wc: wc.sampler),
    threads: 1
    script:
        "../scripts/stage.py"
