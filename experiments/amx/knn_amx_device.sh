cat > /tmp/a.py <<'E'
import torch,time,json,os
def b(f,r=3):
 f();t=[]
 for _ in range(r):
  s=time.perf_counter();f();t.append(time.perf_counter()-s)
 return min(t)
torch.manual_seed(0)
M,D,N=int(os.environ.get('M',25088)),1024,int(os.environ.get('N',4704))
B=torch.rand(M,D)**4*3;Q=torch.rand(N,D)**4*3
c=B.mean(0);Bt=(B-c).bfloat16().t().contiguous();bn=(B*B).sum(1);Bf=B.t().contiguous()
cn=(B-c).norm(dim=1);cn2=cn*cn
u=2**-8;g=D*2**-24;c1=1.01*2*(2*u+u*u+g*(1+u)**2);c2=1.01*2*u+16*2**-24;fn=1.01*2*g+8*2**-24
r={'cpu':open('/proc/cpuinfo').read().split('model name')[1].split('\n')[0],'torch':torch.__version__,'M':M,'N':N,'runs':[]}
for th in (2,16):
 torch.set_num_threads(th)
 def ex():
  return ((Q*Q).sum(1,keepdim=True)+bn-2*Q@Bf).clamp_min(0).min(1)
 def sl():
  qc=Q-c;a=(qc.bfloat16()@Bt).float();q2=(qc*qc).sum(1)
  dt=q2[:,None]+cn2-2*a;bd=c1*q2.sqrt()[:,None]*cn+c2*a.abs()+fn*((Q*Q).sum(1)[:,None]+bn)
  up=(dt+bd).min(1,keepdim=True).values;k=(dt-bd)<=up
  i,j=k.nonzero(as_tuple=True)
  d=((Q*Q).sum(1)[i]+bn[j]-2*(Q[i]*B[j]).sum(1)).clamp_min(0)
  return torch.full((N,),float('inf')).scatter_reduce(0,i,d,'amin'),k.sum(1)
 te=b(ex);ts=b(sl);tg=b(lambda:(Q-c).bfloat16()@Bt);tf=b(lambda:Q@Bf)
 w=ex().values;gt,cnt=sl()
 r['runs'].append(dict(threads=th,exact_s=te,shortlist_s=ts,bf16_gemm_s=tg,f32_gemm_s=tf,short_mean=cnt.float().mean().item(),short_max=cnt.max().item(),maxdiff=((gt-w).abs()/(Q*Q).sum(1)).max().item()))
print(json.dumps(r))
E
/opt/torch/.venv/bin/python3 /tmp/a.py
