# SCRATCH stand-in, not committed
import numpy as np
from scipy.optimize import minimize
def _qp(G, lo, eq_idx):
    T=G.shape[0]
    x0=np.array([1.0/len(eq_idx) if i in eq_idx else 0.0 for i in range(T)])
    cons=[{"type":"eq","fun":lambda x: x[eq_idx].sum()-1}] if eq_idx else []
    r=minimize(lambda x: x@G@x, x0, jac=lambda x: 2*G@x, bounds=[(l,None) for l in lo], constraints=cons, method="SLSQP", options={"ftol":1e-15,"maxiter":500})
    return r.x
def simplex_min_norm(G, **k): return _qp(G,[0]*len(G), list(range(len(G))))
def pareto_min_norm(G,c,**k): return _qp(G,c,list(range(len(G))))
def main_aux_min_norm(G,main,**k):
    lo=[0]*len(G); lo[main]=1
    x=_qp(G,lo,[main]); return x
def mixed_min_norm(G,main,**k): return _qp(G,[0]*len(G),list(main))
def min_norm_two_weights(G):
    d=G[0,0]-2*G[0,1]+G[1,1]; a=0.5 if d<=1e-300 else min(max((G[1,1]-G[0,1])/d,0),1); return np.array([a,1-a])
def main_aux_one_weights(G,main):
    a=1-main; w=np.zeros(2); w[main]=1; w[a]=max(0,-G[0,1])/G[a,a] if G[a,a]>0 else 0; return w
class SimplexQP:
    def __init__(self,T,min_weights=None): self.c=min_weights or [0]*T
    def solve(self,G): return pareto_min_norm(G,self.c)
class MainAuxQP:
    def __init__(self,T,main): self.main=main
    def solve(self,G): return main_aux_min_norm(G,self.main)
class MixedQP:
    def __init__(self,T,main): self.main=main
    def solve(self,G): return mixed_min_norm(G,self.main)
