"""The vocab-parallel KL against torch's float64 KL, value and gradient (TP=1 here; the TP=2
path is checked end to end in test_qat_parallel against the single-process QAD run)."""

import torch
import torch.nn.functional as F


def test_vocab_parallel_kl_matches_float64_reference(megatron_single):
    from megaquant.train.distill import vocab_parallel_kl

    g = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(2, 5, 40, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(2, 5, 40, generator=g)
    for temp in (1.0, 2.5):
        kl = vocab_parallel_kl(student, teacher, megatron_single.tp_group, temp)
        s64 = student.detach().double().requires_grad_()
        ref = F.kl_div(F.log_softmax(s64 / temp, -1), F.log_softmax(teacher.double() / temp, -1),
                       reduction="none", log_target=True).sum(-1) * temp ** 2
        torch.testing.assert_close(kl.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        (grad,) = torch.autograd.grad(kl.sum(), student)
        (ref_grad,) = torch.autograd.grad(ref.sum(), s64)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_kl_is_zero_for_identical_logits(megatron_single):
    from megaquant.train.distill import vocab_parallel_kl

    x = torch.randn(3, 7, 11)
    assert vocab_parallel_kl(x, x, megatron_single.tp_group).abs().max() < 1e-5
