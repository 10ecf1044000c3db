#include <lora/optim.hpp>
#include <lora/safetensors.hpp>

#include "test_util.hpp"

#include <nlohmann/json.hpp>

#include <memory>

using MatD = lora::Mat<double>;

namespace {

const lora::SafeTensors& recorded() {
  static const lora::SafeTensors st = lora::SafeTensors::open(data_path("recorded/training.safetensors"));
  return st;
}

// Runs opt over one parameter with the recorded gradients; compares every step with torch.
void replay(lora::Optimizer<double>& opt, const std::string& name) {
  const auto& st = recorded();
  MatD p = st.matrix<double>("param0"), g = MatD::Zero(p.rows(), p.cols());
  lora::MatMap<double> grad(g.data(), g.rows(), g.cols());  // the optimizer reads through this view
  opt.add({{"p", lora::MatMap<double>(p.data(), p.rows(), p.cols()), grad}});
  const int steps = nlohmann::json::parse(st.metadata().at("case"))["steps"].get<int>();
  for (int i = 0; i < steps; ++i) {
    grad = st.matrix<double>("grad" + std::to_string(i));
    opt.step();
    const MatD expect = st.matrix<double>(name + ".step" + std::to_string(i));
    EXPECT_LT((p - expect).cwiseAbs().maxCoeff(), 1e-14) << name << " step " << i;
  }
}

}  // namespace

TEST(Optim, AdamWMatchesTorch) {
  lora::AdamWOptions o;
  o.lr = 0.01;
  o.weight_decay = 0.1;
  lora::AdamW<double> opt(o);
  replay(opt, "adamw");
  EXPECT_EQ(opt.steps(), 5);
}

TEST(Optim, AdamWDefaultsAreTorchDefaults) {
  lora::AdamW<double> opt;
  EXPECT_EQ(opt.lr(), 1e-3);
  replay(opt, "adamw_defaults");
}

TEST(Optim, SgdMatchesTorch) {
  lora::SgdOptions m;
  m.lr = 0.05;
  m.momentum = 0.9;
  m.dampening = 0.1;
  m.weight_decay = 0.01;
  lora::Sgd<double> momentum(m);
  replay(momentum, "sgd_momentum");
  lora::SgdOptions n;
  n.lr = 0.05;
  n.momentum = 0.9;
  n.nesterov = true;
  n.weight_decay = 0.01;
  lora::Sgd<double> nesterov(n);
  replay(nesterov, "sgd_nesterov");
  lora::SgdOptions plain;
  plain.lr = 0.05;
  lora::Sgd<double> sgd(plain);
  replay(sgd, "sgd_plain");
}

TEST(Optim, ClipGradNormMatchesTorch) {
  const auto& st = recorded();
  MatD a = st.matrix<double>("clip.grad_a"), b = st.matrix<double>("clip.grad_b");
  MatD va = MatD::Zero(a.rows(), a.cols()), vb = MatD::Zero(b.rows(), b.cols());
  std::vector<lora::Parameter<double>> params = {
      {"a", lora::MatMap<double>(va.data(), va.rows(), va.cols()), lora::MatMap<double>(a.data(), a.rows(), a.cols())},
      {"b", lora::MatMap<double>(vb.data(), vb.rows(), vb.cols()), lora::MatMap<double>(b.data(), b.rows(), b.cols())}};
  const double norm = lora::clip_grad_norm(params, 0.5);
  EXPECT_NEAR(norm, st.matrix<double>("clip.norm")(0, 0), 1e-14);
  EXPECT_LT((a - st.matrix<double>("clip.clipped_a")).cwiseAbs().maxCoeff(), 1e-15);
  EXPECT_LT((b - st.matrix<double>("clip.clipped_b")).cwiseAbs().maxCoeff(), 1e-15);
  // Under the limit nothing changes.
  const MatD a2 = a;
  lora::clip_grad_norm(params, 10.0);
  EXPECT_EQ(a, a2);
}

TEST(Optim, LoraPlusGivesBTheLargerLearningRate) {
  MatD A = MatD::Zero(1, 2), B = MatD::Zero(2, 1), gA = MatD::Ones(1, 2), gB = MatD::Ones(2, 1);
  std::vector<lora::Parameter<double>> params = {
      {"q_proj.lora_A", lora::MatMap<double>(A.data(), 1, 2), lora::MatMap<double>(gA.data(), 1, 2)},
      {"q_proj.lora_B", lora::MatMap<double>(B.data(), 2, 1), lora::MatMap<double>(gB.data(), 2, 1)}};
  lora::SgdOptions o;
  o.lr = 0.01;
  lora::Sgd<double> opt(o);
  lora::add_loraplus(opt, params);  // ratio 16
  opt.step();
  EXPECT_DOUBLE_EQ(A(0, 0), -0.01);
  EXPECT_DOUBLE_EQ(B(0, 0), -0.16);
}

TEST(Optim, WarmupCosineSchedule) {
  // Values of transformers' get_cosine_schedule_with_warmup, computed by hand.
  EXPECT_DOUBLE_EQ(lora::warmup_cosine_lr(1.0, 0, 10, 110), 0.0);
  EXPECT_DOUBLE_EQ(lora::warmup_cosine_lr(1.0, 5, 10, 110), 0.5);
  EXPECT_DOUBLE_EQ(lora::warmup_cosine_lr(1.0, 10, 10, 110), 1.0);
  EXPECT_NEAR(lora::warmup_cosine_lr(1.0, 60, 10, 110), 0.5, 1e-15);   // half way: cos(π/2) = 0
  EXPECT_NEAR(lora::warmup_cosine_lr(2.0, 35, 10, 110), 2.0 * 0.5 * (1 + std::sqrt(0.5)), 1e-15);  // a quarter
  EXPECT_NEAR(lora::warmup_cosine_lr(1.0, 110, 10, 110), 0.0, 1e-15);
}

TEST(Optim, BadSettingsThrow) {
  lora::AdamWOptions o;
  o.beta1 = 1.0;
  EXPECT_LORA_ERROR(lora::AdamW<double>{o}, "AdamW: betas are (1, 0.999)");
  lora::SgdOptions s;
  s.nesterov = true;
  EXPECT_LORA_ERROR(lora::Sgd<double>{s}, "nesterov needs momentum > 0");
  lora::Sgd<double> sgd;
  EXPECT_LORA_ERROR(sgd.set_lr(-1), "lr is -1");
  EXPECT_LORA_ERROR(sgd.add({}, 0.0), "lr_scale is 0");
}

// save_state / load_state: an optimizer restored from another's state continues as it would have
// (SGD's momentum and first-step rule, AdamW's bias correction), bit for bit; a state for other
// parameters changes nothing.
TEST(Optim, StateRoundTripsExactly) {
  const auto& st = recorded();
  for (const bool adam : {false, true}) {
    SCOPED_TRACE(adam ? "AdamW" : "SGD");
    auto make = [&]() -> std::unique_ptr<lora::Optimizer<double>> {
      if (adam) return std::make_unique<lora::AdamW<double>>(lora::AdamWOptions{0.01, 0.9, 0.999, 1e-8, 0.1});
      lora::SgdOptions o;
      o.lr = 0.05;
      o.momentum = 0.9;
      return std::make_unique<lora::Sgd<double>>(o);
    };
    MatD p = st.matrix<double>("param0"), g = MatD::Zero(p.rows(), p.cols());
    MatD q = p, h = g;
    // the optimizers read and write through views: assignments go through them too (a moved-in
    // matrix would leave a view on freed memory)
    lora::MatMap<double> pm(p.data(), p.rows(), p.cols()), gm(g.data(), g.rows(), g.cols());
    lora::MatMap<double> qm(q.data(), q.rows(), q.cols()), hm(h.data(), h.rows(), h.cols());
    auto a = make(), b = make();
    a->add({{"w", pm, gm}});
    b->add({{"w", qm, hm}});
    for (int i = 0; i < 2; ++i) {
      gm = st.matrix<double>("grad" + std::to_string(i));
      a->step();
    }
    a->set_lr(a->lr() / 3);  // a rate with every digit used: it must come back exactly
    lora::SafeTensorsBuilder saved;
    a->save_state(saved);
    const lora::SafeTensors state = lora::SafeTensors::from_bytes(saved.serialize());
    EXPECT_EQ(state.metadata().at("steps"), "2");
    qm = pm;
    b->load_state(state);
    EXPECT_EQ(b->steps(), 2);
    EXPECT_EQ(b->lr(), a->lr());
    for (int i = 2; i < 5; ++i) {
      gm = hm = st.matrix<double>("grad" + std::to_string(i));
      a->step();
      b->step();
    }
    EXPECT_EQ(q, p);

    MatD r = MatD::Zero(3, 3), rg = r;
    auto c = make();
    c->add({{"w", lora::MatMap<double>(r.data(), 3, 3), lora::MatMap<double>(rg.data(), 3, 3)}});
    EXPECT_LORA_ERROR(c->load_state(state), adam ? "w.exp_avg is F64" : "w.momentum_buffer is F64", "expected F64 [3, 3]");
    EXPECT_EQ(c->steps(), 0);
  }
}
