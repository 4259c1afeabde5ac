//! The element-wise loops of the fused ops, compiled once per SIMD level (AVX-512, AVX2, ...)
//! and chosen at run time: the crate itself targets baseline x86-64, where these loops get
//! 4-wide SSE2. Plain loops; the compiler vectorises each copy for its target. Element-wise
//! arithmetic has no reassociation, so every copy gives bit-identical results.

/// dst += src.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
}

/// Rows of y (row length = bias length) = act(y + b), act = max(z, slope z) or the identity.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
pub fn bias_act_rows(y: &mut [f32], bias: &[f32], slope: Option<f32>) {
    for row in y.chunks_mut(bias.len().max(1)) {
        match slope {
            Some(s) => row.iter_mut().zip(bias).for_each(|(v, &b)| {
                let z = *v + b;
                *v = z.max(z * s);
            }),
            None => row.iter_mut().zip(bias).for_each(|(v, &b)| *v += b),
        }
    }
}

/// out = g where y > 0, g * slope elsewhere (the LeakyReLU gradient, read from its output).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
pub fn leaky_grad(out: &mut [f32], g: &[f32], y: &[f32], slope: f32) {
    out.iter_mut().zip(g.iter().zip(y)).for_each(|(o, (&g, &y))| *o = g * if y > 0.0 { 1.0 } else { slope });
}

/// acc (length c) += the sum of the rows of `block` (rows of length c), in row order.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
pub fn add_rows(acc: &mut [f32], block: &[f32]) {
    for row in block.chunks(acc.len().max(1)) {
        acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
    }
}

/// Rows of y (row length = bias length) += x + b.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
pub fn add_bias_rows(y: &mut [f32], x: &[f32], bias: &[f32]) {
    for (row, xrow) in y.chunks_mut(bias.len().max(1)).zip(x.chunks(bias.len().max(1))) {
        row.iter_mut().zip(xrow).zip(bias).for_each(|((v, &x), &b)| *v += x + b);
    }
}
