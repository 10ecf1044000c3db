#include "svd_once.hpp"  // first: the SVDs are instantiated once, in svd_once.cpp

#include <lora/combine.hpp>
#include <lora/safetensors.hpp>

#include "test_util.hpp"

#include <nlohmann/json.hpp>

using MatD = lora::Mat<double>;
using Factors = lora::AdapterFactors<double>;

namespace {

double max_abs(const MatD& m) { return m.cwiseAbs().maxCoeff(); }

MatD delta(const Factors& f) { return f.scaling * f.B * f.A; }

}  // namespace

// PEFT's add_weighted_adapter(["a", "c"], [0.7, -0.4], …) on the multi_adapter fixture; a has
// r 4, c has r 4 with rsLoRA. Weights and ranks come from the file's metadata.
template <class Scalar>
void check_fixture(double tol_exact, double tol_svd) {
  const auto st = lora::SafeTensors::open(data_path("peft/multi_adapter.safetensors"));
  const auto c = nlohmann::json::parse(st.metadata().at("case"));
  const auto& w = c["weighted"];
  std::vector<lora::AdapterFactors<Scalar>> in;
  for (const auto& name : w["adapters"]) {
    const std::string n = name.template get<std::string>();
    in.push_back({st.matrix<Scalar>(n + ".lora_A"), st.matrix<Scalar>(n + ".lora_B"), c["scalings"][n].template get<double>()});
  }
  const auto weights = w["weights"].template get<std::vector<double>>();
  const bool rslora = c["adapters"][w["adapters"][0].template get<std::string>()]["use_rslora"].template get<bool>();
  struct Case {
    const char* key;
    lora::Combination type;
    int svd_rank;
    double tol;
  };
  for (const Case& k : {Case{"w_cat", lora::Combination::cat, 0, tol_exact}, Case{"w_linear", lora::Combination::linear, 0, tol_exact},
                        Case{"w_svd", lora::Combination::svd, w["svd_rank"].template get<int>(), tol_svd}}) {
    const auto r = lora::add_weighted_adapter<Scalar>(in, weights, k.type, k.svd_rank, rslora);
    EXPECT_DOUBLE_EQ(r.scaling, c["scalings"][k.key].template get<double>()) << k.key;
    const MatD expected = st.matrix<double>(std::string(k.key) + ".delta");
    const MatD got = r.scaling * MatD((r.B * r.A).template cast<double>());
    EXPECT_LT(max_abs(got - expected) / (std::is_same_v<Scalar, float> ? max_abs(expected) : 1.0), k.tol) << k.key;
  }
}

TEST(Combine, MatchesPeftAddWeightedAdapterInDouble) { check_fixture<double>(1e-10, 1e-8); }
TEST(Combine, MatchesPeftAddWeightedAdapterInFloat) { check_fixture<float>(1e-5, 1e-5); }

TEST(Combine, CatIsExactAndSvdKeepsTheTopTriplets) {
  const Factors a{random_normal(2, 6, 1), random_normal(5, 2, 2), 2.0}, b{random_normal(3, 6, 3), random_normal(5, 3, 4), 0.5};
  const auto cat = lora::add_weighted_adapter<double>({a, b}, {0.3, -1.5}, lora::Combination::cat);
  EXPECT_EQ(cat.A.rows(), 5);
  const MatD sum = 0.3 * delta(a) - 1.5 * delta(b);
  EXPECT_LT(max_abs(delta(cat) - sum), 1e-13);
  // svd of rank 5 (the rank of the sum) is exact too; rank 2 leaves the tail singular values.
  EXPECT_LT(max_abs(delta(lora::add_weighted_adapter<double>({a, b}, {0.3, -1.5}, lora::Combination::svd, 5)) - sum), 1e-12);
  const auto svd2 = lora::add_weighted_adapter<double>({a, b}, {0.3, -1.5}, lora::Combination::svd, 2);
  const Eigen::VectorXd sv = Eigen::JacobiSVD<MatD>(sum).singularValues();
  EXPECT_NEAR((delta(svd2) - sum).norm(), sv.tail(sv.size() - 2).norm(), 1e-12);
  EXPECT_EQ(lora::add_weighted_adapter<double>({a, b}, {1, 1}, lora::Combination::svd).A.rows(), 3);  // the largest rank
  EXPECT_DOUBLE_EQ(lora::add_weighted_adapter<double>({a, b}, {1, 1}, lora::Combination::cat, 0, true).scaling, std::sqrt(5.0));
}

TEST(Combine, BadInputIsRefused) {
  const Factors a{random_normal(2, 6, 1), random_normal(5, 2, 2), 2.0}, b{random_normal(3, 6, 3), random_normal(5, 3, 4), 0.5};
  const Factors wide{random_normal(2, 7, 1), random_normal(5, 2, 2), 1.0};
  EXPECT_LORA_ERROR(lora::add_weighted_adapter<double>({}, {}, lora::Combination::cat), "no adapters");
  EXPECT_LORA_ERROR(lora::add_weighted_adapter<double>({a, b}, {1}, lora::Combination::cat), "2 adapters but 1 weights");
  EXPECT_LORA_ERROR(lora::add_weighted_adapter<double>({a, b}, {1, 1}, lora::Combination::linear), "linear needs equal ranks",
                    "adapter 1 has r = 3");
  EXPECT_LORA_ERROR(lora::add_weighted_adapter<double>({a, wide}, {1, 1}, lora::Combination::cat), "adapter 1 has A (2, 7)",
                    "expected A (r, 6)");
  EXPECT_LORA_ERROR(lora::add_weighted_adapter<double>({a, b}, {1, NAN}, lora::Combination::svd), "weight 1", "not finite");
  EXPECT_LORA_ERROR(lora::add_weighted_adapter<double>({a, b}, {1, 1}, lora::Combination::svd, 6), "svd_rank is 6",
                    "min(out, in) = 5");
  EXPECT_LORA_ERROR(lora::add_weighted_adapter<double>({a, b}, {1, 1}, lora::Combination::cat, 2), "svd_rank is only for");
}
