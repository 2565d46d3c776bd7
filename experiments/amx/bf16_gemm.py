"""Which bf16 matrix product paths reach AMX on this CPU, at 2 threads (issue 12)."""
import os, time, torch
torch.set_num_threads(int(os.environ.get("T", "2")))
def med(f, n=9):
    f(); f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3
M, K, N = 784, 1024, 22579
a = torch.rand(M, K); b = torch.rand(N, K)
ab, bb = a.bfloat16(), b.bfloat16()
bT = b.T.contiguous(); bbT = bb.T.contiguous()
print("torch", torch.__version__, "threads", torch.get_num_threads(), "mkldnn", torch.backends.mkldnn.is_available())
print(f"fp32 a@b.T            {med(lambda: a @ b.T):7.1f} ms")
print(f"fp32 a@bT(contig)     {med(lambda: a @ bT):7.1f} ms")
print(f"bf16 a@b.T            {med(lambda: ab @ bb.T):7.1f} ms")
print(f"bf16 a@bT(contig)     {med(lambda: ab @ bbT):7.1f} ms")
print(f"bf16 F.linear         {med(lambda: torch.nn.functional.linear(ab, bb)):7.1f} ms")
try:
    am, wm = ab.to_mkldnn(), bb.to_mkldnn()
    print(f"bf16 mkldnn_linear    {med(lambda: torch._C._nn.mkldnn_linear(am, wm)):7.1f} ms")
except Exception as e:
    print("mkldnn_linear failed:", str(e)[:200])
try:
    print(f"bf16 addmm fp32 out?  {med(lambda: torch.addmm(torch.zeros(M, N, dtype=torch.bfloat16), ab, bbT)):7.1f} ms")
except Exception as e:
    print("addmm failed:", str(e)[:200])
# int8 path for reference (not usable for a proof of shortlist: quantization error too large)
