"""Shared check: a training stage stopped by its checkpoint callback and resumed in a fresh model ends with the
same weights as one uninterrupted run."""
import pytest
import torch

from indexcache.tools.train import run_stage


def assert_resume_equals_uninterrupted(stage, tc, fresh, corpus, *, steps=4, stop_at=2, lr=1e-2, seed=5):
    """``fresh()`` builds the same initial model each call."""
    a = fresh()
    run_stage(a, corpus, stage, steps, lr, tc, torch.Generator().manual_seed(seed), progress=False)
    b, g, saved = fresh(), torch.Generator().manual_seed(seed), {}

    class Stop(Exception):
        pass

    def ck(step, opt):  # the checkpoint runs after every step here
        if step == stop_at:
            saved.update(opt=opt.state_dict(), gen=g.get_state(),
                         model={k: v.clone() for k, v in b.state_dict().items()})
            raise Stop

    with pytest.raises(Stop):
        run_stage(b, corpus, stage, steps, lr, tc, g, progress=False, checkpoint=ck, checkpoint_every_s=0.0)
    c = fresh()
    c.load_state_dict(saved["model"])
    g2 = torch.Generator()
    g2.set_state(saved["gen"])
    run_stage(c, corpus, stage, steps, lr, tc, g2, progress=False, start_step=stop_at, opt_state=saved["opt"])
    for (n, x), y in zip(a.state_dict().items(), c.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=n)
