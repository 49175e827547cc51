// LlamaRope: lowered from Rust by #[attention_variant]
struct Variant {
  static constexpr bool kSoftmax = true;
  static constexpr bool kHasQuery = true;
  static constexpr bool kHasKey = true;
  static constexpr bool kHasLogits = false;
  static constexpr bool kHasMask = false;
  static constexpr bool kHasOutput = false;
  static constexpr bool kHasSink = false;
  __device__ __forceinline__ static float query(const Params& self, float x, float partner, unsigned i, const fi::Pos& at) {
    const auto half = at.head_dim / 2u;
    const auto inv_freq = powf(self.theta, -2.0f * fi::as_f32(i % half) / fi::as_f32(at.head_dim));
    const auto q_abs = fi::as_i32(at.qo_pos) + fi::as_i32(at.kv_len) - fi::as_i32(at.qo_len);
    const auto angle = fi::as_f32(q_abs) * inv_freq;
    return (i < half ? x * cosf(angle) - partner * sinf(angle) : x * cosf(angle) + partner * sinf(angle));
  }
  __device__ __forceinline__ static float key(const Params& self, float x, float partner, unsigned i, const fi::Pos& at) {
    const auto half = at.head_dim / 2u;
    const auto inv_freq = powf(self.theta, -2.0f * fi::as_f32(i % half) / fi::as_f32(at.head_dim));
    const auto angle = fi::as_f32(at.kv_pos) * inv_freq;
    return (i < half ? x * cosf(angle) - partner * sinf(angle) : x * cosf(angle) + partner * sinf(angle));
  }
};
