"""``dsfast eval``: diversity, memorisation and fidelity of a folder of generated images.

    dsfast eval --samples DIR --train DIR [--metric fallback|lpips [--lpips-net vgg|alex]] [--fid] [--json OUT]

Prints a table and optionally writes the full result (per-cluster scores included) as JSON.
The metrics are documented in :mod:`dsfast.eval.metrics` and :mod:`dsfast.eval.distances`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from dsfast.argtypes import ArgumentParser, output_file, positive_int, torch_device
from dsfast.eval.distances import LPIPS_NETS, LPIPS_SIZE, MetricUnavailable, get_distance
from dsfast.eval.metrics import evaluate
from dsfast.images import ImageFolderError, image_sizes, list_images, load_folder


def parse_args(argv):
    p = ArgumentParser(prog="dsfast eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", required=True, type=Path, help="folder of generated images")
    p.add_argument("--train", required=True, type=Path, help="folder of the (few-shot) training images")
    p.add_argument("--metric", choices=("fallback", "lpips"), default="fallback",
                   help="distance for the diversity metrics: 'fallback' (multi-scale Haar, no weights; default) "
                        "or 'lpips' (the Intra-LPIPS protocol: lpips v0.1, VGG, 256x256, [-1, 1]; needs the lpips "
                        "package and the network's weights on disk)")
    p.add_argument("--lpips-net", choices=tuple(LPIPS_NETS), default="vgg",
                   help="LPIPS network: 'vgg' (the protocol's, default) or 'alex' (not comparable with published numbers)")
    p.add_argument("--lpips-size", type=positive_int, default=LPIPS_SIZE,
                   help="LPIPS: every image is resized (bilinear) to SIZE x SIZE before the network (protocol: 256)")
    p.add_argument("--fid", action="store_true",
                   help="also compute FID (pytorch-fid or torch-fidelity with Inception weights on disk)")
    p.add_argument("--size", type=positive_int, default=None,
                   help="resize every image to SIZE x SIZE (default: the training images' size when sizes differ)")
    p.add_argument("--max-per-cluster", type=positive_int, default=50, help="members per cluster used for the pairs")
    p.add_argument("--device", type=torch_device, default="cpu", help="device for LPIPS / FID networks")
    p.add_argument("--json", type=output_file, default=None,
                   help="write the full result to this JSON file (its folder must exist)")
    return p.parse_args(argv)


def format_table(result: dict) -> str:
    intra = result["intra_cluster"]
    label = "fallback" if result["metric"].startswith("fallback") else "LPIPS"
    mem = result["memorisation"]
    rows = [
        ("distance", result["metric_label"]),
        ("samples / training images", f"{result['num_samples']} / {result['num_train']}"),
        (f"intra-cluster diversity [{label}]", f"{intra['mean']:.4f} ± {intra['std']:.4f}"),
        ("clusters used / empty / singleton",
         f"{intra['clusters_used']} / {intra['clusters_empty']} / {intra['clusters_singleton']}"),
        (f"memorisation rate [{label}]",
         f"{mem['rate']:.3f} ({mem['count']} samples, threshold {mem['threshold']:.4f})" if mem.get("rate") is not None
         else f"n/a ({mem['error']})"),
        (f"nearest-training distance [{label}]", f"{result['nn_dist']:.4f}"),
        ("HF energy ratio samples/train", f"{result['hf_ratio']:.3f}"),
    ]
    if "fid" in result:
        fid = result["fid"]
        rows.append(("FID", f"{fid['fid']:.2f} ({fid['backend']})" if "fid" in fid else f"n/a: {fid['error']}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        size = args.size
        if size is None:
            train_sizes = set(image_sizes(list_images(args.train, "--train")))
            sample_sizes = set(image_sizes(list_images(args.samples, "--samples")))
            if len(train_sizes | sample_sizes) > 1:
                size = min(train_sizes)
                print(f"note: images differ in size; resizing all to {size[0]}x{size[1]} (the smallest training size)",
                      file=sys.stderr)
        train, _ = load_folder(args.train, what="--train", size=size)
        samples, _ = load_folder(args.samples, what="--samples", size=size)
        lpips_options = dict(net=args.lpips_net, size=args.lpips_size, device=args.device)
        distance = get_distance(args.metric, **(lpips_options if args.metric == "lpips" else {}))
    except (ImageFolderError, MetricUnavailable) as e:
        print(f"dsfast eval: error: {e}", file=sys.stderr)
        return 2
    result = evaluate(samples, train, distance, max_per_cluster=args.max_per_cluster)
    result["samples_dir"], result["train_dir"] = str(args.samples), str(args.train)
    if args.fid:
        from dsfast.eval.fid import compute_fid

        try:
            result["fid"] = compute_fid(samples, train, args.samples, args.train, device=args.device)
        except MetricUnavailable as e:
            result["fid"] = {"error": str(e)}
            print(f"dsfast eval: FID not computed: {e}", file=sys.stderr)
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
