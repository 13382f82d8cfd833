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
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{CustomOp1, CustomOp2, CustomOp3, Result, Tensor, TensorId, Var};

type Backward = Box<dyn Fn(&Tensor) -> Result<Vec<Option<Tensor>>>>;

/// One recorded op: the tensors its gradients go to, by position, its
/// output, and its backward function (output gradient → input gradients).
struct Entry {
    inputs: Vec<Tensor>,
    output: TensorId,
    backward: Backward,
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

fn push(inputs: Vec<Tensor>, output: &Tensor, backward: Backward) {
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
pub(super) fn apply1<C: CustomOp1 + Send + Sync + 'static>(x: &Tensor, xc: &Tensor, op: C) -> Result<Tensor> {
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
pub(super) fn apply3<C: CustomOp3 + Send + Sync + 'static>(
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
pub(super) fn apply2<C: CustomOp2 + Send + Sync + 'static>(
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
/// the fast path, the copies are made by all threads ([`super::concat`]):
/// two parts by one op each way, more by candle's `cat` forward and our
/// split backward.
pub fn cat(parts: &[&Tensor], dim: usize) -> Result<Tensor> {
    let channels = dim == 1 && parts.len() > 1 && parts.iter().all(|p| p.rank() == 4 && super::applies(p));
    if channels && parts.len() == 2 {
        return super::concat::cat2(parts[0], parts[1]);
    }
    let y = Tensor::cat(parts, dim)?;
    if recording() {
        let sizes: Vec<usize> = parts.iter().map(|p| p.dim(dim)).collect::<Result<_>>()?;
        push(
            parts.iter().map(|&p| p.clone()).collect(),
            &y,
            Box::new(move |g| {
                if channels {
                    return Ok(super::concat::split_channels(g, &sizes)?
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

impl Tape {
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

/// One training step's forward and backward pass: `loss` of the model's
/// output `forward()`. On the fast kernels the backward pass runs on the
/// tape (the loss's own gradient, up to the network's output, still by
/// candle, on a copy of the output); otherwise by candle's
/// `Tensor::backward`. Returns the loss and the variables' gradients.
pub fn forward_backward<E: From<candle_core::Error>>(
    fast: bool,
    forward: impl FnOnce() -> std::result::Result<Tensor, E>,
    loss: impl FnOnce(&Tensor) -> std::result::Result<Tensor, E>,
) -> std::result::Result<(Tensor, GradStore), E> {
    if !fast {
        let output = forward()?;
        let l = loss(&output)?;
        let grads = l.backward()?;
        return Ok((l, grads));
    }
    let (output, tape) = record(forward)?;
    let leaf = Var::from_tensor(&output.detach())?;
    let l = loss(leaf.as_tensor())?;
    let dl = l.backward()?;
    let Some(g) = dl.get(leaf.as_tensor()) else {
        return Err(
            candle_core::Error::Msg("fast backward: the loss does not depend on the network's output".into()).into(),
        );
    };
    let grads = tape.backward(&output, g.clone())?;
    Ok((l, grads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_rel;
    use crate::{Architecture, ModelConfig, Preset, build};
    use candle_core::{DType, Device, ModuleT};
    use candle_nn::{VarBuilder, VarMap};

    /// On each network (narrow widths, batch 3, 32×32), the tape's gradients
    /// are candle's `Tensor::backward` ones for every variable, and every
    /// variable has one.
    #[test]
    fn gradients_match_candle_backward_on_the_three_networks() {
        let dev = Device::Cpu;
        for arch in Architecture::ALL {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
            let model = build(&ModelConfig::preset(arch, Preset::Small), vb).unwrap();
            let x = Tensor::randn(0f32, 1.0, (3, 1, 32, 32), &dev).unwrap();
            let probe = Tensor::randn(0f32, 1.0, (3, 4, 32, 32), &dev).unwrap();
            // not linear in the output, so the loss's own backward matters
            let loss = |o: &Tensor| (o * &probe)?.tanh()?.sum_all();
            let want = loss(&model.forward_t(&x, true).unwrap()).unwrap().backward().unwrap();
            let (l, got) = forward_backward(true, || model.forward_t(&x, true), loss).unwrap();
            assert!(l.to_scalar::<f32>().unwrap().is_finite());
            // The conv biases before a BatchNorm cancel in the normalisation:
            // both gradients are rounding noise around zero, small against
            // the largest gradient (as in the fused layer's test).
            let max_abs = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let vars = vm.all_vars();
            let scale = vars
                .iter()
                .filter_map(|v| want.get(v.as_tensor()).map(max_abs))
                .fold(0f32, f32::max);
            // (BatchNorm's running statistics are variables without one)
            let mut compared = 0;
            for v in &vars {
                match (got.get(v.as_tensor()), want.get(v.as_tensor())) {
                    (Some(g), Some(w)) if max_abs(w) <= 1e-4 * scale => {
                        assert!(
                            max_abs(g) <= 1e-4 * scale,
                            "{arch}: variable {:?}: {} against {scale}",
                            v.dims(),
                            max_abs(g)
                        );
                    }
                    (Some(g), Some(w)) => {
                        let e = max_rel(g, w);
                        assert!(e < 1e-5, "{arch}: variable {:?}: {e}", v.dims());
                        compared += 1;
                    }
                    (None, None) => {}
                    (g, _) => panic!(
                        "{arch}: variable {:?}: gradient only from the tape: {}",
                        v.dims(),
                        g.is_some()
                    ),
                }
            }
            assert!(compared > 10, "{arch}: {compared} gradients compared");
        }
    }

    /// A gradient that reaches a tensor made by an op the tape did not see
    /// is an error.
    #[test]
    fn an_op_off_the_tape_is_an_error() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (2, 2, 3, 3), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::zeros(2, DType::F32, &dev).unwrap()).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 2, 5, 5), &dev).unwrap();
        let (y, tape) = record(|| {
            let h = super::super::conv2d(&x, &w, &b)?;
            // candle's own op between two taped ones
            super::super::conv2d(&h.exp()?, &w, &b)
        })
        .unwrap();
        let err = tape.backward(&y, y.ones_like().unwrap()).unwrap_err();
        assert!(err.to_string().contains("not on the tape"), "{err}");
        // the same with the op on the tape is fine
        let (y, tape) = record(|| super::super::conv2d(&super::super::conv2d(&x, &w, &b)?, &w, &b)).unwrap();
        let g = tape.backward(&y, y.ones_like().unwrap()).unwrap();
        assert!(g.get(w.as_tensor()).is_some() && g.get(b.as_tensor()).is_some());
    }
}
