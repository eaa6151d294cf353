// Elementwise kernels, one thread per element (grid-stride):
//   add:        y = a + b
//   mul:        y = a * b
//   scale:      y = s * a
//   activation: y = f(x),  activation_backward: dx = g * f'(x)   (f = LeakyReLU 0.01, SiLU or softplus, see common.cuh)
#include "common.cuh"

extern "C" __global__ void add_f32(const float* a, const float* b, float* y, int64_t n) {
    FOR_EACH(i, n) y[i] = a[i] + b[i];
}

extern "C" __global__ void mul_f32(const float* a, const float* b, float* y, int64_t n) {
    FOR_EACH(i, n) y[i] = a[i] * b[i];
}

extern "C" __global__ void scale_f32(const float* a, float s, float* y, int64_t n) {
    FOR_EACH(i, n) y[i] = s * a[i];
}

extern "C" __global__ void activation_forward(const float* x, float* y, int64_t n, int act) {
    FOR_EACH(i, n) y[i] = activation_value(act, x[i]);
}

extern "C" __global__ void activation_backward(const float* x, const float* g, float* dx, int64_t n, int act) {
    FOR_EACH(i, n) dx[i] = g[i] * activation_derivative(act, x[i]);
}
