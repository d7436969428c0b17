"""Measure MoEfication's design choices on all-MiniLM-L6-v2's top two FFNs (issue 10).

Clustering (co-activation vs input-weight rows) and router initialisation (least squares vs
group centroids), E = 8, on hidden states of 128 WordNet glosses (fit) and 128 others
(held out). Prints one table. Run: python benchmarks/moefication_choices.py
"""

from __future__ import annotations

import torch

from fedalign.data.datasets import load_wordnet_supersense
from fedalign.models import minilm_path
from fedalign.models.moefy import (
    balanced_kmeans,
    centroid_router,
    ffn_inputs,
    fit_router,
    group_activation_mass,
)


def main() -> None:
    from transformers import AutoTokenizer, BertModel

    torch.set_num_threads(1)
    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    texts = load_wordnet_supersense().texts
    step = len(texts) // 256
    fit_texts = [texts[i] for i in range(0, step * 256, 2 * step)]
    held_texts = [texts[i] for i in range(step, step * 256, 2 * step)]
    E = 8
    print(
        "| layer | clustering | router | top-k | oracle mass share | oracle rel. error "
        "| router top-k overlap (chance k/E) | router rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for layer in (4, 5):
        batches = []
        for chosen in (fit_texts, held_texts):
            enc = tokenizer(
                chosen, padding=True, truncation=True, max_length=48, return_tensors="pt"
            )
            batches.append(
                ffn_inputs(encoder, [layer], enc["input_ids"], enc["attention_mask"])[layer]
            )
        fit_x, held_x = batches
        ffn = encoder.encoder.layer[layer]
        fc_in, act, fc_out = (
            ffn.intermediate.dense,
            ffn.intermediate.intermediate_act_fn,
            ffn.output.dense,
        )
        with torch.no_grad():
            fit_a = act(fc_in(fit_x))
            held_a = act(fc_in(held_x))  # (N, I)
            dense = held_a @ fc_out.weight.T  # (N, H) without bias
            for clustering in ("co-activation", "weight rows"):
                if clustering == "co-activation":
                    pos = fit_a.clamp(min=0)
                    prof = pos.T - pos.T.mean(dim=1, keepdim=True)
                    prof = prof / prof.norm(dim=1, keepdim=True)
                else:
                    prof = fc_in.weight / fc_in.weight.norm(dim=1, keepdim=True)
                labels = balanced_kmeans(prof, E)
                mass = group_activation_mass(held_a, labels, E)  # (N, E)
                contrib = torch.stack(
                    [held_a[:, labels == e] @ fc_out.weight[:, labels == e].T for e in range(E)], 1
                )  # (N, E, H)
                routers = {
                    "least squares": fit_router(fit_x, group_activation_mass(fit_a, labels, E)),
                    "centroids": centroid_router(fc_in.weight, labels, E),
                }
                for k in (1, 2, 4):
                    true_top = mass.topk(k, dim=1).indices
                    oracle = contrib.gather(
                        1, true_top[:, :, None].expand(-1, -1, contrib.shape[2])
                    ).sum(1)
                    share = float((mass.gather(1, true_top).sum(1) / mass.sum(1)).mean())
                    oracle_err = float((oracle - dense).norm() / dense.norm())
                    for rname, weight in routers.items():
                        top = (held_x @ weight.T).topk(k, dim=1).indices
                        hit = (top[:, :, None] == true_top[:, None, :]).any(-1).float().mean()
                        out = contrib.gather(
                            1, top[:, :, None].expand(-1, -1, contrib.shape[2])
                        ).sum(1)
                        err = float((out - dense).norm() / dense.norm())
                        print(
                            f"| {layer} | {clustering} | {rname} | {k} | {share:.3f} | "
                            f"{oracle_err:.3f} | {float(hit):.3f} ({k / E:.3f}) | {err:.3f} |"
                        )


if __name__ == "__main__":
    main()
