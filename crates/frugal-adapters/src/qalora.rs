//! QA-LoRA's merge (Xu et al., ICLR 2024): the adapter reads the average of each group of L
//! input columns (times the number of groups G, as PEFT 0.21 computes it), so its change to the
//! weight is constant within a group and folds into the group's zero point:
//! `zero' = zero - s G (B A)[o, g] / (L * scale[g, o])`. The merged weight
//! stays int4 with the same codes and scales; only the zeros become fractional (Frugal's
//! float-zero GPTQ variant, `docs/formats.md`).

use crate::lora::Lora;
use frugal_core::{Error, Result};
use frugal_quant::int4::Int4Gptq;
use tch::Kind;

/// `q` with adapter `lora` folded into its zero points. `lora` must be a QA-LoRA adapter whose
/// group size is `q`'s, on a weight without act-order (`g_idx[i] = i / group_size`); `name`
/// names the layer in errors.
pub fn merge_into_int4(name: &str, q: &Int4Gptq, lora: &Lora) -> Result<Int4Gptq> {
    let l = q.group_size;
    if lora.pool != l as i64 {
        return Err(Error::Msg(format!(
            "{name}: the QA-LoRA adapter averages groups of {} columns, the int4 weight has \
             groups of {l}; they must be equal for an exact merge",
            lora.pool
        )));
    }
    if lora.magnitude.is_some() {
        return Err(Error::Msg(format!(
            "{name}: a DoRA adapter cannot fold into int4 zero points"
        )));
    }
    if q.g_idx
        .iter()
        .enumerate()
        .any(|(i, &g)| g as usize != i / l)
    {
        return Err(Error::Msg(format!(
            "{name}: the int4 weight uses act-order (g_idx is not i / group_size); QA-LoRA \
             merges only into weights quantized in column order"
        )));
    }
    let groups = q.groups();
    let ba = tch::no_grad(|| lora.b.matmul(&lora.a) * lora.scaling).to_kind(Kind::Float);
    let size = ba.size();
    if size != [q.rows as i64, groups as i64] {
        return Err(Error::Shape {
            name: format!("{name}: QA-LoRA B A"),
            expected: vec![q.rows as i64, groups as i64],
            got: size,
        });
    }
    let ba: Vec<f32> = Vec::try_from(ba.contiguous().view([-1])).map_err(Error::Torch)?;
    let mut zeros = vec![0f32; groups * q.rows];
    for g in 0..groups {
        for o in 0..q.rows {
            let scale = q.scales[g * q.rows + o];
            let delta = ba[o * groups + g] * groups as f32 / (l as f32 * scale);
            zeros[g * q.rows + o] = q.zero(g, o) - delta;
        }
    }
    let mut merged = q.clone();
    merged.zeros_f32 = Some(zeros);
    merged.qzeros.clear();
    Ok(merged)
}
