"""Host-side facts for the offload engine (lead's probe, round 4): CPU memory bandwidth, host AdamW variants
(s per 1e9 params), pinned H2D/D2H bandwidth alone and while a host AdamW runs. Writes JSON to $RES."""
import json, os, sys, threading, time, math
import torch

res = {}
N = int(float(os.environ.get("PROBE_PARAMS", "5e8")))
T = torch.get_num_threads()
res["threads"] = T
res["cpu_count"] = os.cpu_count()

def tm(fn, reps=3):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return min(ts), sorted(ts)[len(ts) // 2]

a = torch.randn(N // 2); b = torch.empty_like(a)
mn, md = tm(lambda: b.copy_(a))
res["host_copy_GBps"] = 2 * a.numel() * 4 / md / 1e9
del a, b

p = torch.randn(N); g32 = torch.randn(N) * 1e-3; g16 = g32.bfloat16(); m = torch.zeros(N); v = torch.zeros(N)
w16 = torch.empty(N, dtype=torch.bfloat16)
st = torch.tensor(0.0)
def fused():
    st.add_(1)
    torch._fused_adamw_([p], [g32], [m], [v], [], [st], lr=1e-4, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)
mn, md = tm(fused)
res["torch_fused_adamw_s_per_B"] = md / N * 1e9
def fused_with_casts():
    g32.copy_(g16); fused(); w16.copy_(p)
mn, md = tm(fused_with_casts)
res["torch_fused_adamw_plus_casts_s_per_B"] = md / N * 1e9

def one_pass(p, m, v, g, w, hp):
    hp = hp.float(); g = g.float()
    p_new = p * hp[0]
    m_new = m * hp[1] + g * hp[2]
    v_new = v * hp[3] + g * g * hp[4]
    denom = v_new.sqrt() / hp[6] + hp[7]
    p_new = p_new - hp[5] * (m_new / denom)
    p.copy_(p_new); m.copy_(m_new); v.copy_(v_new); w.copy_(p_new)
hp = torch.tensor([1 - 1e-6, 0.9, 0.1, 0.999, 0.001, 1e-3, 0.03, 1e-8], dtype=torch.float64)
try:
    t0 = time.perf_counter()
    fn = torch.compile(one_pass, dynamic=True, fullgraph=True)
    fn(p[:4103], m[:4103], v[:4103], g16[:4103], w16[:4103], hp)
    res["compile_s"] = time.perf_counter() - t0
    mn, md = tm(lambda: fn(p, m, v, g16, w16, hp))
    res["compiled_one_pass_s_per_B"] = md / N * 1e9
    # per-chunk calls like the engine (units of 200M params)
    ch = 1 << 26
    def chunks():
        for o in range(0, N, ch):
            fn(p[o:o+ch], m[o:o+ch], v[o:o+ch], g16[o:o+ch], w16[o:o+ch], hp)
    mn, md = tm(chunks)
    res["compiled_one_pass_chunked64M_s_per_B"] = md / N * 1e9
except Exception as e:
    res["compile_error"] = repr(e)[:400]

if torch.cuda.is_available():
    dev = torch.device("cuda")
    S = 1 << 30
    h = torch.empty(S, dtype=torch.uint8).pin_memory(); d = torch.empty(S, dtype=torch.uint8, device=dev)
    def h2d():
        d.copy_(h, non_blocking=True); torch.cuda.synchronize()
    def d2h():
        h.copy_(d, non_blocking=True); torch.cuda.synchronize()
    res["h2d_GBps"] = S / tm(h2d)[1] / 1e9
    res["d2h_GBps"] = S / tm(d2h)[1] / 1e9
    h2 = torch.empty(S, dtype=torch.uint8).pin_memory(); d2 = torch.empty(S, dtype=torch.uint8, device=dev)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    def both():
        with torch.cuda.stream(s1): d.copy_(h, non_blocking=True)
        with torch.cuda.stream(s2): h2.copy_(d2, non_blocking=True)
        torch.cuda.synchronize()
    res["both_GBps"] = 2 * S / tm(both)[1] / 1e9
    # copies while the host AdamW runs in another thread
    stop = [False]
    def adam_loop():
        while not stop[0]:
            fused()
    th = threading.Thread(target=adam_loop); th.start(); time.sleep(0.5)
    res["h2d_GBps_during_host_adam"] = S / tm(h2d, 5)[1] / 1e9
    res["both_GBps_during_host_adam"] = 2 * S / tm(both, 5)[1] / 1e9
    stop[0] = True; th.join()
    # host adam while copies run
    stop2 = [False]
    def copy_loop():
        while not stop2[0]:
            both()
    th = threading.Thread(target=copy_loop); th.start(); time.sleep(0.2)
    res["torch_fused_adamw_s_per_B_during_copies"] = tm(fused)[1] / N * 1e9
    stop2[0] = True; th.join()
    # GPU fused adamw, state resident
    n = 1 << 28
    P, G, M, V = (torch.randn(n, device=dev) for _ in range(4)); STEP = torch.tensor(0.0, device=dev)
    def gstep():
        torch._fused_adamw_([P], [G], [M], [V], [], [STEP], lr=1e-4, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)
        torch.cuda.synchronize()
    res["gpu_fused_adamw_s_per_B"] = tm(gstep)[1] / n * 1e9
print(json.dumps(res, indent=1))
out = os.environ.get("RES", ".")
json.dump(res, open(os.path.join(out, "probe_host.json"), "w"), indent=1)
