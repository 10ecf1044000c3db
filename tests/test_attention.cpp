#include <lora/attention.hpp>

#include "fixture_cases.hpp"
#include "test_util.hpp"

#include <limits>
#include <thread>

using lora::AttentionConfig;
using lora::AttentionMask;
using lora::LoraAttention;
using MatD = lora::Mat<double>;
using Att = LoraAttention<double>;

namespace {

lora::AttentionWeights<double> weights(Eigen::Index d, std::uint64_t seed) {
  lora::AttentionWeights<double> w;
  const double s = 1.0 / std::sqrt(double(d));
  w.q_proj = random_mat(d, d, seed, s);
  w.k_proj = random_mat(d, d, seed + 1, s);
  w.v_proj = random_mat(d, d, seed + 2, s);
  w.o_proj = random_mat(d, d, seed + 3, s);
  w.q_bias = random_mat(d, 1, seed + 4, 0.1).col(0);
  w.k_bias = random_mat(d, 1, seed + 5, 0.1).col(0);
  w.v_bias = random_mat(d, 1, seed + 6, 0.1).col(0);
  w.o_bias = random_mat(d, 1, seed + 7, 0.1).col(0);
  return w;
}

// A layer whose LoRA factors are all non-zero, so every gradient is exercised.
Att make_attention(Eigen::Index d, int heads, std::vector<std::string> targets, double dropout = 0) {
  AttentionConfig cfg;
  cfg.heads = heads;
  cfg.lora.r = 2;
  cfg.lora.alpha = 4;
  cfg.lora.dropout = dropout;
  cfg.target_modules = std::move(targets);
  Att att(weights(d, 1), cfg);
  for (int p = 0; p < 4; ++p)
    if (auto* l = att.lora(Att::kNames[p])) l->set_lora_B(random_mat(d, 2, 20 + p, 0.3));
  return att;
}

double max_abs(const MatD& m) { return m.cwiseAbs().maxCoeff(); }

// L = Σ dy ⊙ forward_train(query, context, context), masks fixed by reseeding. Central
// differences for every LoRA parameter, the query and the context, against backward().
void check_finite_differences(Att& att, const MatD& x, const MatD& ctx, Eigen::Index batch,
                              const AttentionMask<double>& mask, bool self) {
  const MatD dy = random_mat(x.rows(), att.d_model(), 99);
  auto run = [&](const MatD& xq, const MatD& xc) {
    att.reseed(5);
    return self ? att.forward_train(xq, batch, mask) : att.forward_train(xq, xc, batch, mask);
  };
  auto loss = [&](const MatD& xq, const MatD& xc) { return (run(xq, xc).array() * dy.array()).sum(); };
  att.zero_grad();
  run(x, ctx);
  const auto g = att.backward(dy);
  const MatD dx = self ? g.self() : g.d_query;
  const MatD dctx = g.context();
  const double tol = 1e-7;
  int checked = expect_parameter_gradients(att.parameters(), [&] { return loss(x, ctx); }, tol);
  if (self)
    checked += expect_input_gradient(x, dx, [&](const MatD& xs) { return loss(xs, xs); }, tol);
  else
    checked += expect_input_gradient(x, dx, [&](const MatD& xq) { return loss(xq, ctx); }, tol) +
               expect_input_gradient(ctx, dctx, [&](const MatD& c) { return loss(x, c); }, tol, "context");
  EXPECT_GT(checked, 50);
}

}  // namespace

class AttentionFixture : public ::testing::TestWithParam<const char*> {};

TEST_P(AttentionFixture, MatchesPeft) {
  fixture::Report r = fixture::check_file(data_path(std::string("peft/") + GetParam() + ".safetensors"));
  ASSERT_TRUE(r.supported) << r.note;
  EXPECT_GE(r.comparisons.size(), 2u * 8u);
  for (const auto& c : r.comparisons) EXPECT_TRUE(c.ok()) << c.scalar << " " << c.what << ": " << c.error;
}

INSTANTIATE_TEST_SUITE_P(Attention, AttentionFixture, ::testing::Values("attention_self_causal", "attention_cross_padded"));

TEST(Attention, SelfCausalPaddedGradientsMatchFiniteDifferences) {
  auto att = make_attention(8, 2, {"q_proj", "k_proj", "v_proj", "o_proj"}, 0.25);
  AttentionMask<double> mask;
  mask.causal = true;
  mask.key_padding = lora::Mat<std::uint8_t>::Zero(2, 5);
  mask.key_padding(1, 4) = mask.key_padding(1, 3) = 1;
  const MatD x = random_mat(10, 8, 3);
  check_finite_differences(att, x, x, 2, mask, true);
}

TEST(Attention, CrossPaddedGradientsMatchFiniteDifferences) {
  auto att = make_attention(8, 4, {"q_proj", "v_proj"});
  AttentionMask<double> mask;
  mask.key_padding = lora::Mat<std::uint8_t>::Zero(2, 3);
  mask.key_padding(0, 2) = 1;
  mask.additive = random_mat(4, 3, 8, 0.5);
  check_finite_differences(att, random_mat(8, 8, 4), random_mat(6, 8, 5), 2, mask, false);
}

// Prefix-tuning: the layer with a prefix against attention written out by hand over the
// concatenated keys [Pk; K_b] and values [Pv; V_b] (the masks reach only the sequence's keys).
TEST(Attention, PrefixIsAttendedBeforeTheSequencesOwnKeys) {
  const Eigen::Index d = 6, heads = 2, dh = 3, p = 2, T = 3, batch = 2;
  AttentionConfig cfg;
  cfg.heads = heads;
  cfg.target_modules = {};
  cfg.prefix = {p, 0, 1.0, 7};
  const auto w = weights(d, 1);
  const Att att(w, cfg);
  ASSERT_NE(att.prefix(), nullptr);
  MatD work;
  const MatD KV = att.prefix()->values(work);
  ASSERT_EQ(KV.rows(), p);
  ASSERT_EQ(KV.cols(), 2 * d);
  AttentionMask<double> mask;
  mask.causal = true;
  mask.key_padding = lora::Mat<std::uint8_t>::Zero(batch, T);
  mask.key_padding(1, 0) = 1;  // sequence 1's first token: its first query sees only the prefix
  const MatD x = random_mat(batch * T, d, 3);
  auto proj = [](const MatD& in, const MatD& W, const Eigen::VectorXd& b) -> MatD { return (in * W.transpose()).rowwise() + b.transpose(); };
  const MatD Q = proj(x, w.q_proj, w.q_bias), K = proj(x, w.k_proj, w.k_bias), V = proj(x, w.v_proj, w.v_bias);
  MatD O = MatD::Zero(batch * T, d);
  for (Eigen::Index b = 0; b < batch; ++b)
    for (Eigen::Index h = 0; h < heads; ++h)
      for (Eigen::Index i = 0; i < T; ++i) {
        std::vector<double> z;
        std::vector<Eigen::VectorXd> vals;
        for (Eigen::Index j = 0; j < p; ++j) {
          z.push_back(Q.row(b * T + i).segment(h * dh, dh).dot(KV.row(j).segment(h * dh, dh)) / std::sqrt(double(dh)));
          vals.push_back(KV.row(j).segment(d + h * dh, dh).transpose());
        }
        for (Eigen::Index j = 0; j <= i; ++j)
          if (!mask.key_padding(b, j)) {
            z.push_back(Q.row(b * T + i).segment(h * dh, dh).dot(K.row(b * T + j).segment(h * dh, dh)) / std::sqrt(double(dh)));
            vals.push_back(V.row(b * T + j).segment(h * dh, dh).transpose());
          }
        double total = 0;
        for (double v : z) total += std::exp(v);
        for (std::size_t k = 0; k < z.size(); ++k) O.row(b * T + i).segment(h * dh, dh) += std::exp(z[k]) / total * vals[k].transpose();
      }
  const MatD want = proj(O, w.o_proj, w.o_bias);
  EXPECT_LE(max_abs(att.forward(x, batch, mask) - want), 1e-13);
  // No prefix: a different output (the prefix is attended to).
  AttentionConfig plain = cfg;
  plain.prefix.length = 0;
  EXPECT_GT(max_abs(Att(w, plain).forward(x, batch, mask) - want), 1e-3);
}

TEST(Attention, PrefixGradientsMatchFiniteDifferences) {
  for (const lora::Index projection : {0, 5}) {  // the table itself; through the article's MLP
    AttentionConfig cfg;
    cfg.heads = 2;
    cfg.lora.r = 2;
    cfg.lora.alpha = 4;
    cfg.target_modules = {"q_proj"};
    cfg.prefix = {3, projection, 0.5, 11};
    Att att(weights(8, 1), cfg);
    att.lora("q_proj")->set_lora_B(random_mat(8, 2, 21, 0.3));
    std::vector<std::string> names;
    for (auto& prm : att.parameters()) names.push_back(prm.name);
    const std::vector<std::string> want =
        projection ? std::vector<std::string>{"q_proj.lora_A.default", "q_proj.lora_B.default", "prefix.embedding", "prefix.mlp.0.weight",
                                              "prefix.mlp.0.bias", "prefix.mlp.2.weight", "prefix.mlp.2.bias"}
                   : std::vector<std::string>{"q_proj.lora_A.default", "q_proj.lora_B.default", "prefix.kv"};
    EXPECT_EQ(names, want);
    EXPECT_EQ(att.trainable_parameters(), 2 * (2 * 8) + (projection ? 3 * 8 + 5 * 8 + 5 + 16 * 5 + 16 : 3 * 16));
    AttentionMask<double> mask;
    mask.causal = true;
    mask.key_padding = lora::Mat<std::uint8_t>::Zero(2, 4);
    mask.key_padding(1, 0) = mask.key_padding(1, 1) = 1;
    const MatD x = random_mat(8, 8, 3);
    check_finite_differences(att, x, x, 2, mask, true);
    // The forward of evaluation is the training forward's.
    EXPECT_LE(max_abs(att.forward(x, 2, mask) - att.forward_train(x, 2, mask)), 1e-15);
    if (projection) {  // folded: the same outputs, from the table alone
      const MatD before = att.forward(x, 2, mask);
      att.prefix()->fold();
      EXPECT_FALSE(att.prefix()->reparameterised());
      EXPECT_EQ(att.parameters().back().name, "prefix.kv");
      EXPECT_EQ(att.trainable_parameters(), 2 * (2 * 8) + 3 * 16);
      EXPECT_LE(max_abs(att.forward(x, 2, mask) - before), 1e-15);
    }
  }
}

TEST(Attention, BadPrefixesAreRefused) {
  AttentionConfig cfg;
  cfg.prefix.length = -1;
  EXPECT_LORA_ERROR(Att(weights(4, 1), cfg), "LoraAttention: prefix length is -1, expected >= 0");
  EXPECT_LORA_ERROR(lora::Prefix<double>(4, {0}), "Prefix: length is 0, expected >= 1");
  EXPECT_LORA_ERROR(lora::Prefix<double>(4, {2, -3}), "Prefix: projection is -3");
  lora::Prefix<double> prefix(4, {2});
  EXPECT_LORA_ERROR(prefix.backward(MatD::Zero(2, 4)), "Prefix::backward: dKV is (2, 4), expected (2, 8)");
}

// The single-head LoRAAttention of the LoRA write-ups: LoRA on Q, K, V; the output projection
// frozen.
TEST(Attention, SingleHeadWithFrozenOutputProjection) {
  auto att = make_attention(6, 1, {"q_proj", "k_proj", "v_proj"});
  EXPECT_EQ(att.lora(Att::Proj::o), nullptr);
  EXPECT_EQ(att.parameters().size(), 6u);
  EXPECT_EQ(att.trainable_parameters(), 3 * (2 * 6 + 6 * 2));
  const MatD x = random_mat(4, 6, 6);
  check_finite_differences(att, x, x, 1, {}, true);
}

TEST(Attention, MergeGivesTheSameOutputAndUnmergeRestores) {
  auto att = make_attention(8, 2, {"q_proj", "k_proj", "v_proj", "o_proj"});
  const MatD x = random_mat(6, 8, 7);
  AttentionMask<double> mask;
  mask.causal = true;
  const MatD y = att.forward(x, 2, mask);
  att.merge();
  EXPECT_TRUE(att.is_merged());
  EXPECT_LT(max_abs(att.forward(x, 2, mask) - y), 1e-12);
  EXPECT_LORA_ERROR(att.forward_train(x, 2, mask), "LoraAttention::forward_train", "merged");
  att.unmerge();
  EXPECT_FALSE(att.is_merged());
  EXPECT_LT(max_abs(att.forward(x, 2, mask) - y), 1e-12);
}

TEST(Attention, EvalForwardIsThreadSafe) {
  const auto att = make_attention(8, 2, {"q_proj", "k_proj", "v_proj", "o_proj"});
  AttentionMask<double> mask;
  mask.causal = true;
  std::vector<MatD> xs, expect, got(4);
  for (int t = 0; t < 4; ++t) {
    xs.push_back(random_mat(2 * (3 + t), 8, 50 + t));  // different lengths per thread
    expect.push_back(att.forward(xs.back(), 2, mask));
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int k = 0; k < 50; ++k) got[t] = att.forward(xs[t], 2, mask);
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(got[t], expect[t]);
}

TEST(Attention, LargeBatchRunsHeadsInParallelAndEqualsEachSequenceAlone) {
  // batch·heads·T·S·dh = 10·4·32·32·8 is above the size at which the (sequence, head) pairs run
  // in parallel (when OpenMP is on); one sequence alone is below it and runs them in turn.
  const Eigen::Index d = 32, T = 32, batch = 10;
  auto att = make_attention(d, 4, {"q_proj", "k_proj", "v_proj", "o_proj"});
  const MatD x = random_mat(batch * T, d, 11), dy = random_mat(batch * T, d, 12);
  AttentionMask<double> mask;
  mask.causal = true;
  mask.key_padding = lora::Mat<std::uint8_t>::Zero(batch, T);
  for (Eigen::Index b = 0; b < batch; ++b) mask.key_padding.row(b).tail(b).setOnes();  // b padded keys

  const MatD y_eval = att.forward(x, batch, mask);
  att.zero_grad();
  const MatD y = att.forward_train(x, batch, mask);
  const MatD dx = att.backward(dy).self();
  std::vector<MatD> grads;
  for (const auto& p : att.parameters()) grads.push_back(p.grad);

  att.zero_grad();  // the sequences one by one: their LoRA gradients add up
  double err_y = 0, err_dx = 0, err_eval = 0;
  for (Eigen::Index b = 0; b < batch; ++b) {
    AttentionMask<double> mb;
    mb.causal = true;
    mb.key_padding = mask.key_padding.row(b);
    const MatD xb = x.middleRows(b * T, T);
    err_eval = std::max(err_eval, max_abs(att.forward(xb, 1, mb) - y_eval.middleRows(b * T, T)));
    err_y = std::max(err_y, max_abs(att.forward_train(xb, 1, mb) - y.middleRows(b * T, T)));
    err_dx = std::max(err_dx, max_abs(att.backward(dy.middleRows(b * T, T)).self() - dx.middleRows(b * T, T)));
  }
  EXPECT_LT(err_eval, 1e-13);
  EXPECT_LT(err_y, 1e-13);
  EXPECT_LT(err_dx, 1e-12);
  const auto params = att.parameters();
  ASSERT_EQ(params.size(), grads.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    EXPECT_GT(max_abs(grads[i]), 1e-3) << params[i].name;
    EXPECT_LT(max_abs(params[i].grad - grads[i]), 1e-11) << params[i].name;
  }
}

// Evaluation computes x·Aᵀ once for the projections that read the same matrix (q, k, v in
// self-attention, k and v in cross-attention; detail/linear_shared_input.hpp); a projection with
// DoRA, two active adapters, its adapters disabled or merged runs its own forward. Training runs
// each projection alone, so with no dropout every case gives forward_train's output.
TEST(Attention, ProjectionsSharingAnInputGiveTheTrainingForwardsOutput) {
  const Eigen::Index d = 16, T = 12, batch = 2, r = 1;
  ASSERT_GT(lora::detail::stacked_width<double>(3 * r), 0);  // q, k, v stack in this build
  AttentionConfig cfg;
  cfg.heads = 4;
  cfg.lora.r = int(r);
  cfg.lora.alpha = 2;
  cfg.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  const MatD x = random_mat(batch * T, d, 31), ctx = random_mat(batch * 9, d, 32);
  AttentionMask<double> mask;
  mask.causal = true;
  const auto expect_training_output = [&](Att& att, const MatD& base) {
    const MatD y = att.forward(x, batch, mask), yc = att.forward(x, ctx, batch);
    EXPECT_GT(max_abs(y - base), 1e-3);  // the LoRA terms count
    EXPECT_LT(max_abs(att.forward_train(x, batch, mask) - y), 1e-13);
    EXPECT_LT(max_abs(att.forward_train(x, ctx, batch) - yc), 1e-13);
  };
  const auto fresh = [&] {
    Att att(weights(d, 3), cfg);
    for (int p = 0; p < 4; ++p) att.lora(Att::kNames[p])->set_lora_B(random_mat(d, r, 40 + p, 0.3));
    return att;
  };
  Att plain = fresh();
  plain.lora(Att::Proj::q)->enable_adapters(false);
  plain.lora(Att::Proj::k)->enable_adapters(false);
  plain.lora(Att::Proj::v)->enable_adapters(false);
  plain.lora(Att::Proj::o)->enable_adapters(false);
  const MatD base = plain.forward(x, batch, mask);
  {
    SCOPED_TRACE("all three share x");
    Att att = fresh();
    expect_training_output(att, base);
  }
  {
    SCOPED_TRACE("k with DoRA");
    Att att = fresh();
    lora::LoraConfig dora = cfg.lora;
    dora.use_dora = true;
    att.lora(Att::Proj::k)->add_adapter("dora", dora);
    att.lora(Att::Proj::k)->set_adapter("dora");
    att.lora(Att::Proj::k)->set_lora_B("dora", random_mat(d, r, 50, 0.3));
    expect_training_output(att, base);
  }
  {
    SCOPED_TRACE("q with two active adapters");
    Att att = fresh();
    att.lora(Att::Proj::q)->add_adapter("second", cfg.lora);
    att.lora(Att::Proj::q)->set_lora_B("second", random_mat(d, r, 51, 0.3));
    att.lora(Att::Proj::q)->set_adapter({"default", "second"});
    expect_training_output(att, base);
  }
  {
    SCOPED_TRACE("v disabled");
    Att att = fresh();
    att.lora(Att::Proj::v)->enable_adapters(false);
    expect_training_output(att, base);
  }
  {
    SCOPED_TRACE("q merged");
    Att att = fresh();
    const MatD y = att.forward(x, batch, mask);
    att.lora(Att::Proj::q)->merge();
    EXPECT_LT(max_abs(att.forward(x, batch, mask) - y), 1e-12);
  }
}

TEST(Attention, FullyMaskedQueriesGiveTheOutputBiasAndNoNaN) {
  auto att = make_attention(8, 2, {"q_proj", "v_proj"});
  AttentionMask<double> mask;
  mask.key_padding = lora::Mat<std::uint8_t>::Zero(2, 3);
  mask.key_padding.row(1).setOnes();  // sequence 1 has no visible key
  const MatD x = random_mat(6, 8, 1);
  const MatD y = att.forward_train(x, 2, mask);
  ASSERT_TRUE(y.allFinite());
  // o_proj has no LoRA here, so a zero attention output leaves exactly its bias.
  lora::AttentionWeights<double> w = weights(8, 1);
  for (Eigen::Index t = 3; t < 6; ++t) EXPECT_LT((y.row(t).transpose() - w.o_bias).cwiseAbs().maxCoeff(), 1e-15);
  const auto g = att.backward(random_mat(6, 8, 2));
  EXPECT_TRUE(g.self().allFinite());
  // Masked keys receive no gradient through K or V from any query.
  EXPECT_LT(max_abs(g.d_key.bottomRows(3)), 1e-15);
  EXPECT_LT(max_abs(g.d_value.bottomRows(3)), 1e-15);
}

TEST(Attention, ShortQueriesLongerKeysAndOneHead) {
  auto att = make_attention(4, 1, {"q_proj", "v_proj"});
  const MatD q = random_mat(2, 4, 1), kv = random_mat(10, 4, 2);  // batch 2: T = 1, S = 5
  const MatD y = att.forward(q, kv, 2);
  EXPECT_EQ(y.rows(), 2);
  // With T = 1 each query attends over its own sequence's 5 keys only.
  const MatD y0 = att.forward(q.topRows(1), kv.topRows(5), 1);
  EXPECT_LT(max_abs(y.topRows(1) - y0), 1e-14);
  check_finite_differences(att, q, kv, 2, {}, false);
}

TEST(Attention, InvalidShapesThrowAndChangeNothing) {
  AttentionConfig cfg;
  cfg.heads = 3;
  EXPECT_LORA_ERROR(Att(weights(8, 1), cfg), "d_model 8 is not divisible by heads 3");
  cfg.heads = 2;
  cfg.target_modules = {"q_proj", "gate_proj"};
  EXPECT_LORA_ERROR(Att(weights(8, 1), cfg), "unknown target module 'gate_proj'");
  auto w = weights(8, 1);
  w.k_bias = lora::Vec<double>::Zero(5);
  cfg.target_modules = {"q_proj"};
  EXPECT_LORA_ERROR(Att(w, cfg), "k_proj bias is (5), expected (8)");

  auto att = make_attention(8, 2, {"q_proj", "v_proj"});
  const MatD x = random_mat(6, 8, 1), dy = random_mat(6, 8, 2);
  EXPECT_LORA_ERROR(att.forward(random_mat(6, 7, 1), 2), "LoraAttention::forward: query is (6, 7), expected (batch·len, 8)");
  EXPECT_LORA_ERROR(att.forward(x, 4), "query is (6, 8)", "batch 4");
  EXPECT_LORA_ERROR(att.forward(x, x, random_mat(4, 8, 3), 2), "key is (6, 8) but value is (4, 8)");
  AttentionMask<double> bad;
  bad.key_padding = lora::Mat<std::uint8_t>::Zero(2, 4);
  EXPECT_LORA_ERROR(att.forward(x, 2, bad), "key_padding mask is (2, 4), expected (2, 3)");
  AttentionMask<double> bad_add;
  bad_add.additive = MatD::Zero(3, 4);
  EXPECT_LORA_ERROR(att.forward(x, 2, bad_add), "additive mask is (3, 4), expected (3, 3)");
  EXPECT_LORA_ERROR(att.backward(dy), "LoraAttention::backward", "forward_train first");
  // A refused call leaves a good training forward usable.
  att.forward_train(x, 2);
  EXPECT_LORA_ERROR(att.forward_train(x, 4), "batch 4");
  EXPECT_LORA_ERROR(att.backward(random_mat(6, 9, 1)), "dY is (6, 9), expected (6, 8)");
  const auto g = att.backward(dy);
  EXPECT_TRUE(g.self().allFinite());
  EXPECT_GT(max_abs(att.lora(Att::Proj::q)->grad_A()), 0.0);
}

// A merge between forward_train and backward is refused before any projection accumulates a
// gradient (before: a dX off by 1.5 in a layer whose |dX| <= 10.8).
TEST(Attention, BackwardAfterAMergeIsRefusedAndChangesNoGradient) {
  Att att = make_attention(8, 2, {"q_proj", "v_proj", "o_proj"});
  const MatD x = random_mat(6, 8, 1), dy = random_mat(6, 8, 2);
  att.forward_train(x, 2);
  att.lora(Att::Proj::q)->merge();  // one projection, directly
  EXPECT_LORA_ERROR(att.backward(dy), "LoraAttention::backward", "q_proj", "discarded by merge()");
  for (const char* p : {"q_proj", "v_proj", "o_proj"}) EXPECT_EQ(max_abs(att.lora(p)->grad_B()), 0.0) << p;
  att.unmerge();
  att.forward_train(x, 2);
  att.merge();
  EXPECT_LORA_ERROR(att.backward(dy), "discarded by merge()");
  for (const char* p : {"q_proj", "v_proj", "o_proj"}) EXPECT_EQ(max_abs(att.lora(p)->grad_B()), 0.0) << p;
}

// safe_merge checks every projection before merging any (before: q_proj was merged when v_proj's
// check failed).
TEST(Attention, SafeMergeIsAllOrNothing) {
  lora::AttentionWeights<double> w = weights(8, 1);
  w.v_proj(3, 4) = std::numeric_limits<double>::quiet_NaN();
  AttentionConfig cfg;
  cfg.heads = 2;
  cfg.target_modules = {"q_proj", "v_proj"};
  Att att(std::move(w), cfg);
  att.lora(Att::Proj::q)->set_lora_B(random_mat(8, 8, 3));
  att.lora(Att::Proj::v)->set_lora_B(random_mat(8, 8, 4));
  const MatD q_before = att.lora(Att::Proj::q)->weight();
  EXPECT_LORA_ERROR(att.safe_merge(), "v_proj", "non-finite", "no layer was changed");
  EXPECT_FALSE(att.is_merged());
  EXPECT_FALSE(att.lora(Att::Proj::q)->is_merged());
  EXPECT_EQ(MatD(att.lora(Att::Proj::q)->weight()), q_before);
  // A finite W + ΔW that overflows is refused the same way.
  lora::AttentionWeights<double> w2 = weights(8, 1);
  AttentionConfig cfg2 = cfg;
  Att big(std::move(w2), cfg2);
  big.lora(Att::Proj::q)->set_lora_B(random_mat(8, 8, 3));
  big.lora(Att::Proj::v)->set_lora_B(MatD::Constant(8, 8, 1e308));
  big.lora(Att::Proj::v)->set_lora_A(MatD::Constant(8, 8, 1e308));
  EXPECT_LORA_ERROR(big.safe_merge(), "v_proj", "non-finite");
  EXPECT_FALSE(big.lora(Att::Proj::q)->is_merged());
  EXPECT_NO_THROW(att.unmerge());
}

TEST(Attention, ProjectionsByName) {
  Att att = make_attention(8, 2, {"q_proj"});
  EXPECT_EQ(att.lora("q_proj"), att.lora(Att::Proj::q));
  EXPECT_EQ(att.lora("k_proj"), nullptr);
  EXPECT_LORA_ERROR(att.lora("x_proj"), "no projection 'x_proj'");
  EXPECT_EQ(att.modules().size(), 1u);
}
