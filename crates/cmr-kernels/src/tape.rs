//! A backward pass of our own for a training step on the fast kernels.
//!
//! candle's `Tensor::backward` accumulates every gradient it hands to an
//! op's input into a fresh zero tensor the size of that input, then adds:
//! for a network's activations that is a zero fill on one thread and an
//! addition over memory per layer, about a tenth of a narrow network's
//! training step. While [`record`] runs a forward pass, each fast op (and
//! [`cat`], and the packing of a layer's per-channel parameters) notes its
//! inputs, its output and its backward function on a tape; [`Tape::backward`]
//! then replays the tape in reverse, handing each op's first gradient
//! contribution to its input as it is and adding only where a tensor
//! feeds several ops (U-Net's skip connections), and returns candle's
//! `GradStore` for the variables. The ops' backward functions are the same
//! ones candle's pass calls, so the gradients agree with
//! `Tensor::backward`'s to rounding: only the order of the additions where a
//! tensor feeds several ops can differ (tested on the three networks, to
//! 1e-5 relative).
//!
//! Every op between the network's input and its output must be on the
//! tape: a gradient that reaches a tensor made by an op the tape did not
//! record is an error, not a silently missing gradient.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{CustomOp1, CustomOp2, CustomOp3, Result, Tensor, TensorId, Var};

use crate::KernelConfig;

type BackwardFn = Box<dyn Fn(&Tensor) -> Result<Vec<Option<Tensor>>>>;

/// One recorded op: the tensors its gradients go to, by position, its
/// output, and its backward function (output gradient → input gradients).
struct Entry {
    inputs: Vec<Tensor>,
    output: TensorId,
    backward: BackwardFn,
}

thread_local! {
    static RECORDING: RefCell<Option<Vec<Entry>>> = const { RefCell::new(None) };
}

/// The ops of one recorded forward pass.
pub struct Tape {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Tape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tape({} ops)", self.entries.len())
    }
}

/// Run `f` (a forward pass) with this thread's fast ops noting themselves on
/// a tape, and return its result with the tape.
pub fn record<R, E>(f: impl FnOnce() -> std::result::Result<R, E>) -> std::result::Result<(R, Tape), E> {
    let outer = RECORDING.with(|r| r.borrow_mut().replace(Vec::new()));
    let result = f();
    let entries = RECORDING
        .with(|r| std::mem::replace(&mut *r.borrow_mut(), outer))
        .unwrap_or_default();
    result.map(|r| (r, Tape { entries }))
}

fn recording() -> bool {
    RECORDING.with(|r| r.borrow().is_some())
}

fn push(inputs: Vec<Tensor>, output: &Tensor, backward: BackwardFn) {
    RECORDING.with(|r| {
        if let Some(entries) = r.borrow_mut().as_mut() {
            entries.push(Entry {
                inputs,
                output: output.id(),
                backward,
            });
        }
    });
}

/// `x.apply_op1(op)`, on the tape when recording. `x` is the op's input as
/// the caller has it (its gradient goes there), `xc` the contiguous one the
/// op reads.
pub(crate) fn apply1<C: CustomOp1 + Send + Sync + 'static>(x: &Tensor, xc: &Tensor, op: C) -> Result<Tensor> {
    if !recording() {
        return xc.apply_op1(op);
    }
    let op: Arc<Box<dyn CustomOp1 + Send + Sync>> = Arc::new(Box::new(op));
    let y = xc.apply_op1_arc(op.clone())?;
    let (xc, res) = (xc.clone(), y.clone());
    push(vec![x.clone()], &y, Box::new(move |g| Ok(vec![op.bwd(&xc, &res, g)?])));
    Ok(y)
}

/// `a.apply_op3(b, c, op)`, on the tape when recording: `given` are the
/// inputs as the caller has them (their gradients go there), `a`, `b`, `c`
/// the contiguous ones the op reads.
pub(crate) fn apply3<C: CustomOp3 + Send + Sync + 'static>(
    given: [&Tensor; 3],
    [a, b, c]: [&Tensor; 3],
    op: C,
) -> Result<Tensor> {
    if !recording() {
        return a.apply_op3(b, c, op);
    }
    let op: Arc<Box<dyn CustomOp3 + Send + Sync>> = Arc::new(Box::new(op));
    let y = a.apply_op3_arc(b, c, op.clone())?;
    let (a, b, c, res) = (a.clone(), b.clone(), c.clone(), y.clone());
    push(
        given.map(Tensor::clone).to_vec(),
        &y,
        Box::new(move |g| {
            let (ga, gb, gc) = op.bwd(&a, &b, &c, &res, g)?;
            Ok(vec![ga, gb, gc])
        }),
    );
    Ok(y)
}

/// `a.apply_op2(b, op)`, on the tape when recording (as [`apply3`]).
pub(crate) fn apply2<C: CustomOp2 + Send + Sync + 'static>(
    given: [&Tensor; 2],
    [a, b]: [&Tensor; 2],
    op: C,
) -> Result<Tensor> {
    if !recording() {
        return a.apply_op2(b, op);
    }
    let op: Arc<Box<dyn CustomOp2 + Send + Sync>> = Arc::new(Box::new(op));
    let y = a.apply_op2_arc(b, op.clone())?;
    let (a, b, res) = (a.clone(), b.clone(), y.clone());
    push(
        given.map(Tensor::clone).to_vec(),
        &y,
        Box::new(move |g| {
            let (ga, gb) = op.bwd(&a, &b, &res, g)?;
            Ok(vec![ga, gb])
        }),
    );
    Ok(y)
}

/// `Tensor::cat(parts, dim)`, on the tape when recording (its backward: the
/// gradient cut back into the parts). Along the channels of f32 images on
/// the fast path, the copies are made by all threads (`concat.rs`): two
/// parts by one op each way, more by candle's `cat` forward and our split
/// backward.
pub fn cat(parts: &[&Tensor], dim: usize, cfg: &KernelConfig) -> Result<Tensor> {
    let channels = dim == 1 && parts.len() > 1 && parts.iter().all(|p| p.rank() == 4 && cfg.applies(p));
    if channels && parts.len() == 2 {
        return crate::concat::cat2(parts[0], parts[1]);
    }
    let y = Tensor::cat(parts, dim)?;
    if recording() {
        let sizes: Vec<usize> = parts.iter().map(|p| p.dim(dim)).collect::<Result<_>>()?;
        push(
            parts.iter().map(|&p| p.clone()).collect(),
            &y,
            Box::new(move |g| {
                if channels {
                    return Ok(crate::concat::split_channels(g, &sizes)?
                        .into_iter()
                        .map(Some)
                        .collect());
                }
                let mut start = 0;
                sizes
                    .iter()
                    .map(|&n| {
                        let part = g.narrow(dim, start, n)?;
                        start += n;
                        Ok(Some(part))
                    })
                    .collect()
            }),
        );
    }
    Ok(y)
}

/// `a + b` (same shapes), on the tape when recording: a residual
/// connection between fast ops.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        candle_core::bail!("add: shapes {:?} and {:?} differ", a.dims(), b.dims());
    }
    let y = (a + b)?;
    if recording() {
        push(
            vec![a.clone(), b.clone()],
            &y,
            Box::new(|g| Ok(vec![Some(g.clone()), Some(g.clone())])),
        );
    }
    Ok(y)
}

/// `x · factor`, on the tape when recording (a weighted side output).
pub fn scale(x: &Tensor, factor: f64) -> Result<Tensor> {
    let y = (x * factor)?;
    if recording() {
        push(vec![x.clone()], &y, Box::new(move |g| Ok(vec![Some((g * factor)?)])));
    }
    Ok(y)
}

/// `x.narrow(dim, start, len)`, on the tape when recording (its backward:
/// the gradient padded with zeros back to `x`'s size).
pub fn narrow(x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    let y = x.narrow(dim, start, len)?;
    if recording() {
        let after = x.dim(dim)? - start - len;
        push(
            vec![x.clone()],
            &y,
            Box::new(move |g| Ok(vec![Some(g.pad_with_zeros(dim, start, after)?)])),
        );
    }
    Ok(y)
}

impl Tape {
    /// Whether every op between the variables and `output` is on the tape:
    /// each recorded op's inputs are variables, constants, or outputs of
    /// ops recorded before it, and so is `output`.
    pub fn covers(&self, output: &Tensor) -> bool {
        let mut made = HashSet::new();
        let known = |t: &Tensor, made: &HashSet<TensorId>| t.is_variable() || !t.track_op() || made.contains(&t.id());
        for entry in &self.entries {
            if !entry.inputs.iter().all(|t| known(t, &made)) {
                return false;
            }
            made.insert(entry.output);
        }
        known(output, &made)
    }

    /// The gradients of the variables given `grad`, the gradient of the
    /// recorded pass's `output`. Errors when a gradient reaches a tensor
    /// made by an op that is not on the tape.
    pub fn backward(self, output: &Tensor, grad: Tensor) -> Result<GradStore> {
        if grad.dims() != output.dims() {
            candle_core::bail!(
                "fast backward: gradient {:?} for an output {:?}",
                grad.dims(),
                output.dims()
            );
        }
        // Each tensor's gradient so far, with the tensor.
        let mut grads: HashMap<TensorId, (Tensor, Tensor)> = HashMap::new();
        grads.insert(output.id(), (output.clone(), grad));
        for entry in self.entries.into_iter().rev() {
            let Some((_, g)) = grads.remove(&entry.output) else {
                continue;
            };
            let input_grads = (entry.backward)(&g)?;
            for (input, ig) in entry.inputs.into_iter().zip(input_grads) {
                let Some(ig) = ig else { continue };
                match grads.get_mut(&input.id()) {
                    Some((_, sum)) => *sum = sum.add(&ig)?,
                    None => {
                        grads.insert(input.id(), (input, ig));
                    }
                }
            }
        }
        let mut store = GradStore::default();
        for (tensor, g) in grads.into_values() {
            if tensor.is_variable() {
                store.insert(&tensor, g);
            } else if tensor.track_op() {
                candle_core::bail!(
                    "fast backward: a gradient reached a tensor {:?} made by an op that is not on the tape",
                    tensor.dims()
                );
            }
        }
        Ok(store)
    }
}

/// How a training step's backward pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backward {
    /// On the tape of the fast ops ([`Tape`]), where it covers the network
    /// (else by candle, see [`forward_backward`]).
    Tape,
    /// candle's `Tensor::backward` (any device, any op).
    Candle,
}

/// One training step's loss and gradients, and the backward pass that made
/// them.
#[derive(Debug)]
pub struct Step {
    pub loss: Tensor,
    pub grads: GradStore,
    /// [`Backward::Candle`] also where the tape was asked for but did not
    /// cover the network (an op between the fast ones that is not on it).
    pub backward: Backward,
}

/// One training step's forward and backward pass: `loss` of the model's
/// output `forward()`. With [`Backward::Tape`] the forward pass is recorded
/// and, where the tape covers it ([`Tape::covers`]), the backward pass runs
/// on the tape (the loss's own gradient, up to the network's output, still
/// by candle, on a copy of the output); where it does not (a plain candle
/// op between fast ones), by candle's `Tensor::backward` over the same
/// forward pass, which every op supports: slower, never wrong.
pub fn forward_backward<E: From<candle_core::Error>>(
    backward: Backward,
    forward: impl FnOnce() -> std::result::Result<Tensor, E>,
    loss: impl FnOnce(&Tensor) -> std::result::Result<Tensor, E>,
) -> std::result::Result<Step, E> {
    let by_candle = |loss: Tensor| -> std::result::Result<Step, E> {
        let grads = loss.backward()?;
        Ok(Step {
            loss,
            grads,
            backward: Backward::Candle,
        })
    };
    if backward == Backward::Candle {
        let output = forward()?;
        return by_candle(loss(&output)?);
    }
    let (output, tape) = record(forward)?;
    if !tape.covers(&output) {
        return by_candle(loss(&output)?);
    }
    let leaf = Var::from_tensor(&output.detach())?;
    let l = loss(leaf.as_tensor())?;
    let dl = l.backward()?;
    let Some(g) = dl.get(leaf.as_tensor()) else {
        return Err(
            candle_core::Error::Msg("fast backward: the loss does not depend on the network's output".into()).into(),
        );
    };
    let grads = tape.backward(&output, g.clone())?;
    Ok(Step {
        loss: l,
        grads,
        backward: Backward::Tape,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv2d;
    use crate::testing::max_rel;
    use candle_core::{DType, Device};

    fn fixture() -> (Var, Var, Tensor) {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (2, 2, 3, 3), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, 2, &dev).unwrap()).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 2, 5, 5), &dev).unwrap();
        (w, b, x)
    }

    /// A gradient that reaches a tensor made by an op the tape did not see
    /// is an error of `Tape::backward`, and `covers` says so beforehand.
    #[test]
    fn an_op_off_the_tape_is_an_error() {
        let cfg = KernelConfig::default();
        let (w, b, x) = fixture();
        let (y, tape) = record(|| {
            let h = conv2d(&x, &w, &b, &cfg)?;
            // candle's own op between two taped ones
            conv2d(&h.exp()?, &w, &b, &cfg)
        })
        .unwrap();
        assert!(!tape.covers(&y));
        let err = tape.backward(&y, y.ones_like().unwrap()).unwrap_err();
        assert!(err.to_string().contains("not on the tape"), "{err}");
        // the same with the op on the tape is fine
        let (y, tape) = record(|| conv2d(&conv2d(&x, &w, &b, &cfg)?, &w, &b, &cfg)).unwrap();
        assert!(tape.covers(&y));
        let g = tape.backward(&y, y.ones_like().unwrap()).unwrap();
        assert!(g.get(w.as_tensor()).is_some() && g.get(b.as_tensor()).is_some());
    }

    /// A residual (`add`), a weighted side output (`scale`) joined to the
    /// main one (`cat`) and cut apart again (`narrow`), all on the tape:
    /// gradients equal candle's; with a plain candle op instead, the step
    /// falls back to candle's backward and still gives its gradients.
    #[test]
    fn plain_ops_on_the_tape_and_the_fallback() {
        let cfg = KernelConfig::default();
        let (w, b, x) = fixture();
        let dev = Device::Cpu;
        let probe = Tensor::randn(0f32, 1.0, (1, 2, 5, 5), &dev).unwrap();
        let loss = |o: &Tensor| -> Result<Tensor> {
            let main = o.narrow(1, 0, 2)?;
            let side = o.narrow(1, 2, 2)?;
            ((main * &probe)?.tanh()?.sum_all()? + (side * &probe)?.sum_all()?)?.sum_all()
        };
        let taped = || -> Result<Tensor> {
            let h = conv2d(&x, &w, &b, &cfg)?;
            let r = add(&conv2d(&h, &w, &b, &cfg)?, &h)?;
            let side = scale(&narrow(&r, 1, 0, 2)?, 0.5)?;
            cat(&[&r, &side], 1, &cfg)
        };
        let plain = || -> Result<Tensor> {
            let h = conv2d(&x, &w, &b, &cfg)?;
            let r = (conv2d(&h, &w, &b, &cfg)? + &h)?;
            let side = (r.narrow(1, 0, 2)? * 0.5)?;
            Tensor::cat(&[&r, &side], 1)
        };
        let want = loss(&plain().unwrap()).unwrap().backward().unwrap();
        for (name, f, expect) in [
            ("taped", &taped as &dyn Fn() -> Result<Tensor>, Backward::Tape),
            ("plain", &plain, Backward::Candle),
        ] {
            let step = forward_backward(Backward::Tape, f, loss).unwrap();
            assert_eq!(step.backward, expect, "{name}");
            for v in [&w, &b] {
                let e = max_rel(step.grads.get(v.as_tensor()).unwrap(), want.get(v.as_tensor()).unwrap());
                assert!(e < 1e-5, "{name}: {e}");
            }
        }
        let step = forward_backward(Backward::Candle, taped, loss).unwrap();
        assert_eq!(step.backward, Backward::Candle);
        let e = max_rel(step.grads.get(w.as_tensor()).unwrap(), want.get(w.as_tensor()).unwrap());
        assert!(e < 1e-5, "candle: {e}");
        // narrow's and add's own checks
        assert!(add(&x, &x.narrow(2, 0, 2).unwrap()).is_err());
        let z = Tensor::zeros((1, 2), DType::F32, &dev).unwrap();
        assert!(narrow(&z, 1, 1, 2).is_err());
    }
}
