"""`signalgraph proof WHICH`: each training proof, one command (docs/training.md)."""

from __future__ import annotations


def proof(args) -> int:
    out = args.out or f"results/proofs/{args.which}"
    steps = {k: v for k, v in (("pt_steps", args.pt_steps), ("it_steps", args.it_steps)) if v is not None}
    if args.which == "choosing":
        from agent.proofs.choosing import choosing

        return choosing(out, resume=args.resume)
    if args.which == "drawing":
        from agent.proofs.drawing import drawing

        return drawing(out, resume=args.resume)
    if args.which == "assistant":
        from agent.proofs.assistant import assistant

        steps.pop("pt_steps", None)  # it starts from trained weights: IT only
        return assistant(out, **steps, resume=args.resume, install_weights=args.install)
    if args.which == "joint":
        from agent.proofs.joint import joint

        if "pt_steps" in steps:
            steps["seeing_pt_steps"] = steps.pop("pt_steps")
        return joint(out, **steps, test_questions=args.test_questions, resume=args.resume,
                     install_weights=args.install)
    from agent.proofs.seeing import seeing

    return seeing(out, **steps, test_questions=args.test_questions, resume=args.resume)
