"""Encoding throughput of the SD VAE (sd-vae-ft-ema's AutoencoderKL architecture) as the encode stage uses it.

    python benchmarks/encode.py --batch 64 --precision bf16                    # random weights (GPU)
    python benchmarks/encode.py --weights /path/to/sd-vae-ft-ema --batch 64    # the real weights, if local

Times speedpipe.models.autoencoder.encode_posterior on 256x256 images, each with its mirror image as the
encode stage stores both: images/s counts dataset images (two encoder passes each). Throughput does not
depend on the weights, so the random-weight architecture gives the same figure when the weights are absent.
"""
import argparse
import time

import torch
from diffusers import AutoencoderKL

from speedpipe.models.autoencoder import SD_VAE_SCALE, encode_posterior, load_pretrained_autoencoder

# stabilityai/sd-vae-ft-ema's config.json (the architecture; weights are irrelevant for throughput).
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=256,
    block_out_channels=[128, 256, 512, 512], act_fn="silu",
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="local sd-vae-ft-ema directory; default: the architecture with random weights")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batches", type=int, default=10, help="timed batches")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_pretrained_autoencoder(args.weights) if args.weights else AutoencoderKL(**SD_VAE_CONFIG).eval()
    vae = vae.to(device)
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1

    def encode():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            mean, std = encode_posterior(vae, torch.cat([images, images.flip(-1)]), SD_VAE_SCALE)
        return mean

    encode()  # warm-up (cuDNN algorithm selection)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.batches):
        latents = encode()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; sd-vae-ft-ema architecture ({'weights ' + args.weights if args.weights else 'random weights'}), "
          f"{args.resolution}x{args.resolution}, batch {args.batch} images (+ mirrors), {args.precision}; latents {tuple(latents.shape[1:])}")
    print(f"  {args.batch * args.batches / seconds:9.1f} images/s ({2 * args.batch * args.batches / seconds:.1f} encoder passes/s)")


if __name__ == "__main__":
    main()
