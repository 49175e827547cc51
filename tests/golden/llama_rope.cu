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
    const unsigned half = fi::div(at.head_dim, 2u);
    const float inv_freq = powf(self.theta, fi::div(fi::mul(-2.0f, fi::as_f32(fi::rem(i, half))), fi::as_f32(at.head_dim)));
    const int q_abs = fi::sub(fi::add(fi::as_i32(at.qo_pos), fi::as_i32(at.kv_len)), fi::as_i32(at.qo_len));
    const float angle = fi::mul(fi::as_f32(q_abs), inv_freq);
    return (i < half ? fi::sub(fi::mul(x, cosf(angle)), fi::mul(partner, sinf(angle))) : fi::add(fi::mul(x, cosf(angle)), fi::mul(partner, sinf(angle))));
  }
  __device__ __forceinline__ static float key(const Params& self, float x, float partner, unsigned i, const fi::Pos& at) {
    const unsigned half = fi::div(at.head_dim, 2u);
    const float inv_freq = powf(self.theta, fi::div(fi::mul(-2.0f, fi::as_f32(fi::rem(i, half))), fi::as_f32(at.head_dim)));
    const float angle = fi::mul(fi::as_f32(at.kv_pos), inv_freq);
    return (i < half ? fi::sub(fi::mul(x, cosf(angle)), fi::mul(partner, sinf(angle))) : fi::add(fi::mul(x, cosf(angle)), fi::mul(partner, sinf(angle))));
  }
};
