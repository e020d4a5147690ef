// Every decoder layer of a decode step in one native call; see native_decode.py.
// Compiled after native_ops.cpp into one library, so it calls the fused operators directly.
namespace {

typedef void (*MatmulKernel)(const float* x, int64_t rows, int64_t columns, const void* weight,
                             int64_t out_features, float* y, int nthreads);

struct NativeLinear {
    int64_t kernel, weight, in_features, out_features;
};

struct DecodeLayer {  // addresses as int64, filled once per model from Python
    int64_t input_norm, post_attention_norm;
    NativeLinear qkv, o, gate_up, down;
    int64_t query_norm, key_norm;  // per-head RMS norm weights (head_dim,) of q and k (Qwen3), or 0
};
static_assert(sizeof(DecodeLayer) == 20 * sizeof(int64_t), "DecodeLayer is 20 int64 values");

struct DecodeBuffers {  // per step, each (batch, its width) float32
    float *hidden, *normed, *qkv, *projected, *gate_up, *activation, *delta;
};
static_assert(sizeof(DecodeBuffers) == 7 * sizeof(int64_t), "DecodeBuffers is 7 addresses");

// Qwen3's q/k norms: each query and key head of each row, RMS-normed in place before attention rotates it.
inline void norm_heads(const DecodeLayer& layer, const DecodeArguments* attention, float* qkv, float eps) {
    const int64_t dim = attention->dim, heads = attention->heads, kv_heads = attention->kv_heads;
    const int64_t width = (heads + 2 * kv_heads) * dim;
    for (int64_t r = 0; r < attention->batch; r++) {
        float* query = qkv + r * width;
        float* key = query + heads * dim;
        ember_add_rms_norm(query, nullptr, (const float*)layer.query_norm, heads, dim, eps, query);
        ember_add_rms_norm(key, nullptr, (const float*)layer.key_norm, kv_heads, dim, eps, key);
    }
}

inline void project(const NativeLinear& linear, const float* x, int64_t rows, float* y, int nthreads) {
    const MatmulKernel kernel = (MatmulKernel)linear.kernel;
    kernel(x, rows, linear.in_features, (const void*)linear.weight, linear.out_features, y, nthreads);
}

}  // namespace

// All layers of one decode step: buffers->hidden (batch, hidden) is the residual stream, updated in place;
// buffers->normed ends as the final RMS norm of it, ready for the output layer. caches: (layers, 2)
// addresses of each layer's key and value cache; attention: the step's DecodeArguments (its out is the
// attention output buffer).
extern "C" void ember_decode_layers(const DecodeLayer* layers, int64_t num_layers, const int64_t* caches,
                                    const DecodeArguments* attention, const DecodeBuffers* buffers,
                                    int64_t hidden_size, int64_t intermediate_size, float eps,
                                    const float* final_norm, int nthreads) {
    const int64_t rows = attention->batch;
    const float* delta = nullptr;  // the previous layer's MLP output, added to the residual stream
    for (int64_t index = 0; index < num_layers; index++) {
        const DecodeLayer& layer = layers[index];
        ember_add_rms_norm(buffers->hidden, delta, (const float*)layer.input_norm, rows, hidden_size, eps,
                           buffers->normed);
        project(layer.qkv, buffers->normed, rows, buffers->qkv, nthreads);
        if (layer.query_norm != 0) norm_heads(layer, attention, buffers->qkv, eps);
        ember_decode_attention(attention, buffers->qkv, (float*)caches[2 * index],
                               (float*)caches[2 * index + 1]);
        project(layer.o, attention->out, rows, buffers->projected, nthreads);
        ember_add_rms_norm(buffers->hidden, buffers->projected, (const float*)layer.post_attention_norm, rows,
                           hidden_size, eps, buffers->normed);
        project(layer.gate_up, buffers->normed, rows, buffers->gate_up, nthreads);
        ember_silu_mul(buffers->gate_up, rows, intermediate_size, buffers->activation);
        project(layer.down, buffers->activation, rows, buffers->delta, nthreads);
        delta = buffers->delta;
    }
    ember_add_rms_norm(buffers->hidden, delta, final_norm, rows, hidden_size, eps, buffers->normed);
}
